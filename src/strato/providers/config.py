"""The providers file: ``$STRATO_HOME/providers.toml`` (or ``STRATO_PROVIDERS_CONFIG``).

```toml
[broker]
max_nodes = 8              # nodes the broker may hold at once (all providers)
budget_per_hour = 40.0     # USD per hour for all of them together
keep_alive_s = 120         # an idle node is given back after this long
cooldown_s = 300           # a failed (provider, region, GPU type) is not tried again for this long
preemption_loss_h = 0.25   # hours of work one spot preemption costs (the cost model)
rebalance_margin = 0.02    # a node dearer per container than the best option by more: cordoned
spot = true                # buy spot where its expected cost is lower

[providers.aws]            # one table per provider (the 13 of the catalog)
enabled = true
kind = "sim"               # sim: simulated (a real worker agent on this machine)
max_nodes = 4
regions = ["us-east-1", "us-west-2"]   # optional: only these (and their zones)
credentials = {}           # passed to the provider; never logged

[sim]
provisioning_delay_s = 1.0

[[sim.faults]]             # faults of simulated providers; each key but kind optional
kind = "out_of_capacity"   # out_of_capacity | error | slow | preempt
provider = "aws"
region = "us-east-1"
gpu = "V100"
times = 1                  # applies this many times (default: always)
delay_s = 30               # slow: provisioning takes this much longer
after_s = 10               # preempt: spot instances are taken back this long after start
when_file = "/tmp/cue"     # preempt: ... once this file exists (removed as it fires: a test's cue)
trace = "AWS3/us-east-1a_v100_1.json"  # preempt: replay this availability trace instead
trace_speed = 600          # trace seconds per real second
```

The file is read again when it changes (its faults and limits apply to the next decision).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strato import settings
from strato.exceptions import InvalidError

from .catalog import PROVIDERS

FAULT_KINDS = ("out_of_capacity", "error", "slow", "preempt")


@dataclass
class Fault:
    kind: str
    provider: str | None = None
    region: str | None = None
    gpu: str | None = None
    times: int | None = None
    delay_s: float = 0.0
    after_s: float | None = None
    when_file: str | None = None
    trace: str | None = None
    trace_speed: float = 1.0

    def matches(self, provider: str, region: str, gpu: str | None) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.region is not None and not (
            region == self.region or region.startswith(self.region + "-")
        ):
            return False
        return self.gpu is None or self.gpu == gpu

    def take(self) -> bool:
        """Apply it once (False: it is used up)."""
        if self.times is None:
            return True
        if self.times <= 0:
            return False
        self.times -= 1
        return True


@dataclass
class ProviderConfig:
    name: str
    enabled: bool = True
    kind: str = "sim"
    max_nodes: int | None = None
    regions: list[str] | None = None
    credentials: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BrokerConfig:
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    max_nodes: int = 8
    budget_per_hour: float = 40.0
    keep_alive_s: float = 120.0
    cooldown_s: float = 300.0
    preemption_loss_h: float = 0.25
    rebalance_margin: float = 0.02
    spot: bool = True
    provisioning_delay_s: float = 1.0
    faults: list[Fault] = field(default_factory=list)
    path: Path | None = None

    @property
    def enabled(self) -> list[str]:
        return [p.name for p in self.providers.values() if p.enabled]


def config_path(home: Path) -> Path:
    return settings.PROVIDERS_CONFIG.get() or home / "providers.toml"


def _check(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise InvalidError(f"{where}: {what}")


def load_config(path: Path) -> BrokerConfig | None:
    """The file at ``path`` (None where it does not exist); a bad one raises
    ``InvalidError`` naming what to fix."""
    if not path.is_file():
        return None
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidError(f"{path}: not a valid TOML file: {e}") from None
    b = doc.get("broker", {})
    cfg = BrokerConfig(path=path)
    for key, cast in (
        ("max_nodes", int),
        ("budget_per_hour", float),
        ("keep_alive_s", float),
        ("cooldown_s", float),
        ("preemption_loss_h", float),
        ("rebalance_margin", float),
    ):
        if key in b:
            value = b[key]
            _check(
                isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                path,
                f"[broker] {key} must be a number >= 0, not {value!r}",
            )
            setattr(cfg, key, cast(value))
    if "spot" in b:
        _check(isinstance(b["spot"], bool), path, "[broker] spot must be true or false")
        cfg.spot = b["spot"]
    for name, p in doc.get("providers", {}).items():
        _check(
            name in PROVIDERS,
            path,
            f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}",
        )
        _check(isinstance(p, dict), path, f"[providers.{name}] must be a table")
        kind = p.get("kind", "sim")
        _check(kind == "sim", path, f"[providers.{name}] kind {kind!r}: only 'sim' is built")
        regions = p.get("regions")
        _check(
            regions is None
            or (isinstance(regions, list) and all(isinstance(r, str) for r in regions)),
            path,
            f"[providers.{name}] regions must be a list of names",
        )
        cfg.providers[name] = ProviderConfig(
            name,
            enabled=bool(p.get("enabled", True)),
            kind=kind,
            max_nodes=p.get("max_nodes"),
            regions=regions,
            credentials=dict(p.get("credentials", {})),
        )
    sim = doc.get("sim", {})
    if "provisioning_delay_s" in sim:
        cfg.provisioning_delay_s = float(sim["provisioning_delay_s"])
    for f in sim.get("faults", []):
        kind = f.get("kind")
        _check(kind in FAULT_KINDS, path, f"fault kind {kind!r}: use one of {FAULT_KINDS}")
        unknown = set(f) - set(Fault.__dataclass_fields__)
        _check(not unknown, path, f"unknown fault keys {sorted(unknown)}")
        cfg.faults.append(Fault(**f))
    return cfg


class ConfigWatch:
    """The file, read again when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self.config: BrokerConfig | None = None

    def poll(self) -> bool:
        """True when the file changed (``config`` is the new one)."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        self.config = load_config(self.path) if mtime is not None else None
        return True
