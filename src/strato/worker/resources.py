"""What this node offers: CPUs, memory, GPUs, region, price and labels.

Detected from the machine (CPU affinity and cgroup quota, ``/proc/meminfo`` and the cgroup
memory limit, ``nvidia-smi``), each overridable by configuration:

- ``STRATO_NODE_CPU`` (cores, e.g. ``"3.5"``), ``STRATO_NODE_MEMORY_MB``,
- ``STRATO_NODE_GPUS`` (``"H100:2,A100-80GB:1"`` -> ``{"H100": [0, 1], "A100-80GB": [2]}``;
  ``""`` = none), ``STRATO_NODE_REGION``, ``STRATO_NODE_PRICE_PER_HOUR``,
- ``STRATO_NODE_LABELS`` (``"zone=a,tier=spot"``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from strato import settings
from strato.exceptions import InvalidError

log = logging.getLogger("strato.worker")

NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass
class NodeInventory:
    cpu: float
    memory_mb: int
    gpus: dict[str, list[int]] = field(default_factory=dict)
    """GPU type (canonical name) -> device indices."""
    region: str | None = None
    price_per_hour: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def gpu_count(self) -> int:
        return sum(len(indices) for indices in self.gpus.values())


def _canonical(name: str) -> str | None:
    from strato.protocol.gpu import canonical_gpu_name

    return canonical_gpu_name(name)


# ---------------------------------------------------------------------------------------
# Detection


def detect_cpu() -> float:
    """Cores this process may use: CPU affinity, or the cgroup quota if smaller."""
    from strato.runtime.cgroups import own_limits

    cores = float(len(os.sched_getaffinity(0)))
    quota, _ = own_limits()
    return min(cores, quota) if quota else cores


def detect_memory_mb(meminfo: str = "/proc/meminfo") -> int:
    """MiB of memory: ``MemTotal``, or the cgroup memory limit if smaller."""
    from strato.runtime.cgroups import own_limits

    total: int | None = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    _, limit = own_limits()
    if limit is not None:
        total = min(total, limit)
    return total // (1024 * 1024)


def query_nvidia_smi(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> str | None:
    """Output of ``nvidia-smi --query-gpu=index,name``; ``None`` if absent or failing."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, assuming no GPUs: %s", exc)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi exited with code %d, assuming no GPUs", done.returncode)
        return None
    return done.stdout


def parse_nvidia_smi(output: str) -> dict[str, list[int]]:
    """``"0, NVIDIA H100 80GB HBM3"`` lines -> ``{"H100": [0]}``.

    A name with no canonical type is kept as printed, with a warning.
    """
    gpus: dict[str, list[int]] = {}
    for line in output.splitlines():
        index_text, sep, name = line.partition(",")
        if not sep or not index_text.strip().isdigit() or not name.strip():
            if line.strip():
                log.warning("ignoring an nvidia-smi line: %r", line)
            continue
        gpu_type = _canonical(name.strip())
        if gpu_type is None:
            gpu_type = name.strip()
            log.warning("unknown GPU type %r; it can only be requested by that name", gpu_type)
        gpus.setdefault(gpu_type, []).append(int(index_text))
    return {t: sorted(indices) for t, indices in gpus.items()}


# ---------------------------------------------------------------------------------------
# Configuration


def _bad(var: str, value: str, expected: str) -> InvalidError:
    return InvalidError(f"{var}={value!r} is not valid: expected {expected}.")


def parse_gpu_override(text: str, var: str = "STRATO_NODE_GPUS") -> dict[str, list[int]]:
    """``"H100:2,A100-80GB:1"`` -> ``{"H100": [0, 1], "A100-80GB": [2]}``; ``""`` -> ``{}``.

    Indices are numbered in the order listed. A bare ``"TYPE"`` means one device.
    """
    expected = 'comma-separated "TYPE:COUNT" entries such as "H100:2,A100-80GB:1", or ""'
    gpus: dict[str, list[int]] = {}
    next_index = 0
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, count_text = (p.strip() for p in entry.partition(":"))
        if not name or (sep and not count_text.isdigit()):
            raise _bad(var, text, expected)
        count = int(count_text) if sep else 1
        gpu_type = _canonical(name)
        if gpu_type is None:
            log.warning("%s names an unknown GPU type %r; using it as given", var, name)
            gpu_type = name
        indices = list(range(next_index, next_index + count))
        next_index += count
        if indices:
            gpus.setdefault(gpu_type, []).extend(indices)
    return gpus


def parse_labels(text: str, var: str = "STRATO_NODE_LABELS") -> dict[str, str]:
    labels: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise _bad(var, text, 'comma-separated "key=value" pairs')
        labels[key.strip()] = value.strip()
    return labels


def detect_inventory(
    env: Mapping[str, str] = os.environ,
    *,
    nvidia_smi: Callable[[], str | None] = query_nvidia_smi,
) -> NodeInventory:
    """This node's resources: configuration where given, else what the machine has.

    ``nvidia_smi`` returns the output of the GPU query (tests pass a fake); it is not
    called when ``STRATO_NODE_GPUS`` is set.
    """
    cpu = settings.NODE_CPU.get(env)
    memory_mb = settings.NODE_MEMORY_MB.get(env)
    price = settings.NODE_PRICE_PER_HOUR.get(env)
    labels = parse_labels(settings.NODE_LABELS.get(env))
    if settings.NODE_GPUS.is_set(env):
        gpus = parse_gpu_override(settings.NODE_GPUS.get(env))
    else:
        output = nvidia_smi()
        gpus = parse_nvidia_smi(output) if output else {}
    return NodeInventory(
        cpu=cpu if cpu is not None else detect_cpu(),
        memory_mb=memory_mb if memory_mb is not None else detect_memory_mb(),
        gpus=gpus,
        region=settings.NODE_REGION.get(env).strip() or None,
        price_per_hour=price,
        labels=labels,
    )
