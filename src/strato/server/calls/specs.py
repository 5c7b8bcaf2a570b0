"""Server-side checks of a function spec, beyond the per-field ranges msgspec enforces on
decode (``strato.protocol.messages``): fields that must agree with each other, and names
the worker will act on. The SDK checks the same things, but the control plane trusts no
client: every spec that reaches the store passes :func:`check_spec`."""

from __future__ import annotations

import math

from strato.exceptions import InvalidError
from strato.protocol import messages as m
from strato.protocol.gpu import parse_gpu

RUNTIMES = ("bwrap", "gvisor", "process")
WEB_KINDS = ("fastapi", "asgi", "wsgi", "server")
MAX_ENV = 1000


def _finite(name: str, v: float, lo: float, hi: float) -> None:
    # msgspec checked these on decode; a spec built in this process (tests, bind) was not
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidError(f"{name}={v!r}: must be a finite number")
    if not lo <= v <= hi:
        raise InvalidError(f"{name}={v!r}: must be between {lo:g} and {hi:g}")


def check_spec(spec: m.FunctionSpec) -> m.FunctionSpec:
    """Raise ``InvalidError`` (HTTP 400) naming the function and the field, or return it."""
    try:
        _check(spec)
    except InvalidError as e:
        raise InvalidError(f"function {spec.name!r}: {e}") from None
    return spec


def _check(spec: m.FunctionSpec) -> None:
    res = spec.resources
    _finite("cpu", res.cpu, 1e-3, m.MAX_CPU)
    if res.cpu_limit is not None:
        _finite("cpu limit", res.cpu_limit, 1e-3, m.MAX_CPU)
        if res.cpu_limit < res.cpu:
            raise InvalidError(f"cpu limit {res.cpu_limit} is below the request {res.cpu}")
    _finite("memory", res.memory_mb, 1, m.MAX_MEMORY_MB)
    if res.memory_limit_mb is not None:
        _finite("memory limit", res.memory_limit_mb, 1, m.MAX_MEMORY_MB)
        if res.memory_limit_mb < res.memory_mb:
            raise InvalidError(
                f"memory limit {res.memory_limit_mb} MiB is below the request {res.memory_mb} MiB"
            )
    if res.gpu:
        parse_gpu(list(res.gpu))  # raises InvalidError for a bad type or count
    sc = spec.scaling
    _finite("min_containers", sc.min_containers, 0, m.MAX_CONTAINERS)
    _finite("buffer_containers", sc.buffer_containers, 0, m.MAX_CONTAINERS)
    if sc.max_containers is not None:
        _finite("max_containers", sc.max_containers, 1, m.MAX_CONTAINERS)
        if sc.min_containers > sc.max_containers:
            raise InvalidError(
                f"min_containers={sc.min_containers} exceeds max_containers={sc.max_containers}"
            )
    if sc.scaledown_window is not None:
        _finite("scaledown_window", sc.scaledown_window, 2, 3600)
    _finite("timeout", spec.timeout, 1, m.MAX_TIMEOUT_S)
    r = spec.retries
    _finite("retries", r.max_retries, 0, m.MAX_RETRIES)
    _finite("backoff_coefficient", r.backoff_coefficient, 1, 10)
    _finite("initial_delay", r.initial_delay, 0, 60)
    _finite("max_delay", r.max_delay, 0, 60)
    _finite("max_inputs", spec.max_inputs, 1, m.MAX_INPUTS)
    if spec.target_inputs is not None:
        _finite("target_inputs", spec.target_inputs, 1, spec.max_inputs)
    _finite("batch_max_size", spec.batch_max_size, 0, m.MAX_BATCH_SIZE)
    _finite("batch_wait_ms", spec.batch_wait_ms, 0, m.MAX_BATCH_WAIT_MS)
    if spec.batch_max_size and spec.max_inputs > 1:
        raise InvalidError("a function cannot be both @batched and @concurrent")
    if spec.runtime is not None and spec.runtime not in RUNTIMES:
        raise InvalidError(f"runtime={spec.runtime!r}: use one of {', '.join(RUNTIMES)}")
    if len(spec.env) > MAX_ENV:
        raise InvalidError(f"env= has {len(spec.env)} variables; at most {MAX_ENV}")
    bad = [k for k in spec.env if not k or "=" in k or "\0" in k or k.startswith("STRATO_")]
    bad += [k for k, v in spec.env.items() if "\0" in v]
    if bad:
        raise InvalidError(f"env= has names or values that cannot be set: {bad[:5]}")
    if not spec.name or not spec.module or not spec.qualname:
        raise InvalidError("a function needs a name, module and qualname")
    web = spec.web
    if web is not None:
        if web.kind not in WEB_KINDS:
            raise InvalidError(f"web endpoint kind {web.kind!r}: use one of {WEB_KINDS}")
        _finite("port", web.port, 0, 65535)
        if web.kind == "server" and web.port == 0:
            raise InvalidError("web_server needs a port from 1 to 65535")
        _finite("startup_timeout", web.startup_timeout, 1e-3, 3600)
