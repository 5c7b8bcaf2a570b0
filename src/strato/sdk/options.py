"""Validation of ``@app.function(...)`` arguments, at decoration time, with clear errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from strato.exceptions import InvalidError
from strato.protocol import messages as m
from strato.protocol.gpu import gpu_request_str, parse_gpu

MAX_TIMEOUT_S = 24 * 3600
MAX_RETRIES = 10


@dataclass(frozen=True)
class Retries:
    """Modal's retry policy: ``Retries(max_retries, backoff_coefficient=2.0,
    initial_delay=1.0, max_delay=60.0)``."""

    max_retries: int
    backoff_coefficient: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= MAX_RETRIES:
            raise InvalidError(
                f"Retries(max_retries={self.max_retries!r}): use an int from 0 to {MAX_RETRIES}"
            )
        if not 1.0 <= self.backoff_coefficient <= 10.0:
            raise InvalidError(
                f"Retries(backoff_coefficient={self.backoff_coefficient!r}): use "
                "a number from 1.0 to 10.0"
            )
        if not 0.0 <= self.initial_delay <= 60.0:
            raise InvalidError(
                f"Retries(initial_delay={self.initial_delay!r}): use 0 to 60 seconds"
            )
        if not 1.0 <= self.max_delay <= 60.0:
            raise InvalidError(f"Retries(max_delay={self.max_delay!r}): use 1 to 60 seconds")

    def to_policy(self) -> m.RetryPolicy:
        return m.RetryPolicy(
            self.max_retries, self.backoff_coefficient, self.initial_delay, self.max_delay
        )


def _pair(name: str, value, cast, unit: str):
    """A number, or a ``(request, limit)`` pair, each positive."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidError(f"{name}={value!r}: use a number or a (request, limit) pair")
        req, limit = value
    else:
        req, limit = value, None
    for v in (req, limit):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise InvalidError(f"{name}={value!r}: {unit} must be a positive number")
    if limit is not None and limit < req:
        raise InvalidError(f"{name}={value!r}: the limit ({limit}) is below the request ({req})")
    return cast(req), None if limit is None else cast(limit)


def resources(cpu, memory, gpu) -> m.Resources:
    cpu_req, cpu_limit = _pair("cpu", 0.125 if cpu is None else cpu, float, "CPU cores")
    mem_req, mem_limit = _pair("memory", 128 if memory is None else memory, int, "memory (MiB)")
    gpus = [gpu_request_str(g) for g in parse_gpu(gpu)] if gpu is not None else []
    return m.Resources(
        cpu=cpu_req, cpu_limit=cpu_limit, memory_mb=mem_req, memory_limit_mb=mem_limit, gpu=gpus
    )


def retry_policy(retries) -> m.RetryPolicy:
    if retries is None:
        return m.RetryPolicy()
    if isinstance(retries, Retries):
        return retries.to_policy()
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise InvalidError(f"retries={retries!r}: use an int or strato.Retries(...)")
    if not 0 <= retries <= MAX_RETRIES:
        raise InvalidError(f"retries={retries}: use 0 to {MAX_RETRIES}")
    # Modal: an int means that many retries, with a fixed 1 s delay
    return m.RetryPolicy(retries, backoff_coefficient=1.0, initial_delay=1.0)


def timeout(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (1 <= value <= MAX_TIMEOUT_S)
    ):
        raise InvalidError(f"timeout={value!r}: use 1 to {MAX_TIMEOUT_S} seconds (24 h)")
    return float(value)


MAX_DISK_MB = 1 << 20


def ephemeral_disk(value) -> int | None:
    """``ephemeral_disk=`` (MiB each writable folder of a container may hold), checked."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DISK_MB:
        raise InvalidError(
            f"ephemeral_disk={value!r}: give a whole number of MiB from 1 to {MAX_DISK_MB}"
        )
    return value


def scaling(min_containers, max_containers, buffer_containers, scaledown_window) -> m.ScalingConfig:
    for name, v, lo in (
        ("min_containers", min_containers, 0),
        ("buffer_containers", buffer_containers, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= m.MAX_CONTAINERS:
            raise InvalidError(f"{name}={v!r}: use an int from {lo} to {m.MAX_CONTAINERS}")
    if max_containers is not None and (
        isinstance(max_containers, bool)
        or not isinstance(max_containers, int)
        or not 1 <= max_containers <= m.MAX_CONTAINERS
    ):
        raise InvalidError(
            f"max_containers={max_containers!r}: use an int from 1 to {m.MAX_CONTAINERS}, or None"
        )
    if max_containers is not None and min_containers > max_containers:
        raise InvalidError(
            f"min_containers={min_containers} exceeds max_containers={max_containers}"
        )
    window = scaledown_window
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int | float) or not 2 <= window <= 3600
    ):
        raise InvalidError(f"scaledown_window={scaledown_window!r}: use 2 to 3600 seconds")
    # None: strato's adaptive keep-alive learns the function's idle times
    return m.ScalingConfig(
        min_containers, max_containers, buffer_containers, None if window is None else float(window)
    )


def env(value) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidError("env= must be a dict of str to str")
    bad = [k for k in value if not k or "=" in k or k.startswith("STRATO_")]
    if bad:
        raise InvalidError(
            f"env= has names that cannot be set: {bad} (empty, containing '=', "
            "or reserved STRATO_*)"
        )
    return dict(value)


_check_timeout, _check_env = timeout, env  # overrides() takes parameters of these names


def _pair_of(req, limit):
    return req if limit is None else (req, limit)


def overrides(
    spec: m.FunctionSpec | None,
    current: dict,
    *,
    cpu=None,
    memory=None,
    gpu=None,
    timeout=None,
    retries=None,
    env=None,
    min_containers=None,
    max_containers=None,
    buffer_containers=None,
    scaledown_window=None,
    runtime=None,
) -> dict:
    """The FunctionSpec fields a ``with_options(...)`` variant changes, validated."""
    ov = dict(current)
    if cpu is not None or memory is not None or gpu is not None:
        base = ov.get("resources") or (spec.resources if spec else m.Resources())
        if isinstance(base, dict):
            base = m.Resources(**base)
        ov["resources"] = resources(
            cpu if cpu is not None else _pair_of(base.cpu, base.cpu_limit),
            memory if memory is not None else _pair_of(base.memory_mb, base.memory_limit_mb),
            gpu if gpu is not None else (base.gpu or None),
        )
    if timeout is not None:
        ov["timeout"] = _check_timeout(timeout)
    if retries is not None:
        ov["retries"] = retry_policy(retries)
    if env is not None:
        ov["env"] = _check_env(env)
    if runtime is not None:
        if runtime not in ("bwrap", "gvisor", "process"):
            raise InvalidError(f"runtime={runtime!r}: use bwrap, gvisor or process")
        ov["runtime"] = runtime
    if any(
        v is not None for v in (min_containers, max_containers, buffer_containers, scaledown_window)
    ):
        sc = spec.scaling if spec else m.ScalingConfig()
        ov["scaling"] = scaling(
            sc.min_containers if min_containers is None else min_containers,
            sc.max_containers if max_containers is None else max_containers,
            sc.buffer_containers if buffer_containers is None else buffer_containers,
            sc.scaledown_window if scaledown_window is None else scaledown_window,
        )
    return ov


# --- broker: begin
def placement(region, cloud, nonpreemptible) -> dict:
    """Modal's ``region=`` (a name or a list; "us" matches "us-east-1"), ``cloud=`` (a
    provider: aws, gcp, lambda, runpod...) and ``nonpreemptible=`` (on-demand nodes only)."""
    if region is not None:
        names = [region] if isinstance(region, str) else region
        if (
            not isinstance(names, list | tuple)
            or not names
            or not all(isinstance(r, str) and r.strip() for r in names)
        ):
            raise InvalidError(f"region={region!r}: use a region name or a list of them")
        region = names[0].strip() if isinstance(region, str) else [r.strip() for r in names]
    if cloud is not None and (not isinstance(cloud, str) or not cloud.strip()):
        raise InvalidError(f"cloud={cloud!r}: use a provider name such as 'aws' or 'gcp'")
    if not isinstance(nonpreemptible, bool):
        raise InvalidError("nonpreemptible= must be True or False")
    return {
        "region": region,
        "cloud": cloud.strip().lower() if cloud else None,
        "nonpreemptible": nonpreemptible,
    }


# --- broker: end
