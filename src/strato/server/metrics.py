"""Prometheus metrics of the control plane (``GET /metrics`` on the API port).

Two kinds, both exposed with the official ``prometheus_client``:

- **Events** (counters and histograms) are counted where they happen, by one-line hooks
  (``input_final``, ``input_duration``, ``input_retry``, ``cold_start``,
  ``gateway_request``, ``store_op``): each costs a dict lookup and one increment (the
  client library's own per-value lock; nothing else). They live in this module's
  ``REGISTRY``: one per process.
- **State** (gauges: inputs queued and running, containers by state, node capacity and
  reservations, apps by state) is computed at scrape time from the control plane's own
  memory by :class:`StateCollector`; nothing is kept up to date for it in between.

Labels are bounded: a function is labelled by its app's name and its own name (stable
across redeploys), and only the first ``STRATO_METRICS_MAX_FUNCTIONS`` such pairs get
their own labels; the rest are counted as ``app="other", function="other"``. No call,
input or container id is ever a label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from strato import settings

from .gateway.routes import web_name
from .store.tables_workspaces import DEFAULT_WORKSPACE

if TYPE_CHECKING:
    from .control import ControlPlane

log = logging.getLogger("strato.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
# seconds: from a millisecond no-op to a long batch job
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
KNOWN_FUNCTIONS = 20_000  # function ids whose label children are cached (then cleared)
STATUSES = ("success", "failure", "died", "timeout", "cancelled")

REGISTRY = CollectorRegistry(auto_describe=True)
FN = ("app", "function")

INPUTS = Counter(
    "strato_inputs",
    "Inputs that ended, by function and final status (success, failure, died, timeout, cancelled).",
    (*FN, "status"),
    registry=REGISTRY,
)
RETRIES = Counter(
    "strato_input_retries", "Failed attempts that were retried.", FN, registry=REGISTRY
)
DURATION = Histogram(
    "strato_input_duration_seconds",
    "How long one input ran in its container (as the container measured it).",
    FN,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
LATENCY = Histogram(
    "strato_input_latency_seconds",
    "From an input's acceptance by the API to its final output: queueing, cold starts, "
    "retries and run time (inputs accepted by this process).",
    FN,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COLD_STARTS = Counter(
    "strato_cold_starts", "Containers that became ready (each a cold start).", FN, registry=REGISTRY
)
COLD_START_SECONDS = Histogram(
    "strato_cold_start_seconds",
    "From a container's placement to its ready (image, process start, imports, @enter).",
    FN,
    buckets=COLD_START_BUCKETS,
    registry=REGISTRY,
)
GATEWAY_REQUESTS = Counter(
    "strato_gateway_requests",
    "Web endpoint requests answered by the gateway, by app and HTTP status code.",
    ("app", "code"),
    registry=REGISTRY,
)
GATEWAY_SECONDS = Histogram(
    "strato_gateway_request_duration_seconds",
    "From a web request's arrival at the gateway to its answer, by app.",
    ("app",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "strato_store_operation_seconds",
    "Store operations on its writer thread: a read, or a committed batch of writes.",
    ("operation",),
    buckets=STORE_BUCKETS,
    registry=REGISTRY,
)


@dataclass(eq=False)
class _Children:
    """The label children of one function's metrics (bound once, incremented often)."""

    labels: tuple[str, str]
    inputs: dict[str, Any]
    latency: Any
    retries: Any
    duration: Any
    cold_starts: Any
    cold_start_seconds: Any


class FunctionLabels:
    """function_id -> its ``(app, function)`` labels, at most ``cap`` distinct pairs.

    ``resolve`` names a function id (app name, function name) or returns None when it is
    unknown; set by the control plane (:func:`install`). What it answered is kept for
    each id (ids it did not know count as ``other``) until it is set again."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._resolve: Callable[[str], tuple[str, str] | None] = lambda fid: None
        self._by_id: dict[str, _Children] = {}
        self._pairs: set[tuple[str, str]] = set()
        self.app_names: dict[str, str] = {}  # app_id -> name (or a short id if unnamed)

    @property
    def resolve(self) -> Callable[[str], tuple[str, str] | None]:
        return self._resolve

    @resolve.setter
    def resolve(self, fn: Callable[[str], tuple[str, str] | None]) -> None:
        self._resolve = fn
        self._by_id = {}

    def app_label(self, app_id: str) -> str:
        name = self.app_names.get(app_id)
        if name is None:
            return OTHER
        return name

    def pair(self, names: tuple[str, str] | None) -> tuple[str, str]:
        """The labels of a function (``other`` for unknown ones and past the cap)."""
        if names is None:
            return (OTHER, OTHER)
        if names in self._pairs:
            return names
        if len(self._pairs) < self.cap:
            self._pairs.add(names)
            return names
        return (OTHER, OTHER)

    def children(self, function_id: str) -> _Children:
        c = self._by_id.get(function_id)
        if c is None:
            c = self._bind(function_id)
        return c

    def _bind(self, function_id: str) -> _Children:
        try:
            names = self._resolve(function_id)
        except Exception:  # a hook never raises into the hot path
            names = None
        labels = self.pair(names)
        c = _Children(
            labels,
            {s: INPUTS.labels(*labels, s) for s in STATUSES},
            LATENCY.labels(*labels),
            RETRIES.labels(*labels),
            DURATION.labels(*labels),
            COLD_STARTS.labels(*labels),
            COLD_START_SECONDS.labels(*labels),
        )
        if len(self._by_id) >= KNOWN_FUNCTIONS:
            self._by_id.clear()
        self._by_id[function_id] = c
        return c


LABELS = FunctionLabels(settings.METRICS_MAX_FUNCTIONS.get())


# ---------------------------------------------------------------------- hooks (hot path)


# input_id -> when the API accepted it (monotonic), until its final output
_ACCEPTED: dict[int, float] = {}
ACCEPTED_KEPT = 1_000_000  # past this many inputs without an output, the oldest are forgotten


def inputs_accepted(pendings: Iterable[Any]) -> None:
    """New inputs were accepted (``Pending``s): their latency starts now."""
    now = time.monotonic()
    accepted = _ACCEPTED
    if len(accepted) >= ACCEPTED_KEPT:
        for input_id in list(accepted)[: ACCEPTED_KEPT // 10]:
            del accepted[input_id]
    for p in pendings:
        accepted[p.input_id] = now


def input_final(function_id: str, status: str, input_id: int | None = None) -> None:
    """An input ended with its final output (``status``: a ``calls.state.Status``)."""
    c = LABELS.children(function_id)
    counter = c.inputs.get(status)
    if counter is not None:
        counter.inc()
    if input_id is not None:
        t0 = _ACCEPTED.pop(input_id, None)
        if t0 is not None:
            c.latency.observe(time.monotonic() - t0)


def input_duration(function_id: str, seconds: float) -> None:
    """An input's run time, as its container measured it."""
    if seconds >= 0:
        LABELS.children(function_id).duration.observe(seconds)


def input_retry(function_id: str) -> None:
    LABELS.children(function_id).retries.inc()


# container_id -> seconds from placement to ready, of the newest containers (the dashboard)
COLD_START_OF: dict[str, float] = {}
COLD_STARTS_KEPT = 10_000


def cold_start(function_id: str, seconds: float, container_id: str = "") -> None:
    """A container became ready ``seconds`` after it was placed."""
    c = LABELS.children(function_id)
    c.cold_starts.inc()
    c.cold_start_seconds.observe(max(0.0, seconds))
    if container_id:
        if len(COLD_START_OF) >= COLD_STARTS_KEPT:
            COLD_START_OF.clear()
        COLD_START_OF[container_id] = seconds


UNROUTED = "unrouted"  # a web request whose URL no app serves


def gateway_request(app_id: str | None, status: int, seconds: float) -> None:
    app = LABELS.app_label(app_id) if app_id is not None else UNROUTED
    GATEWAY_REQUESTS.labels(app, str(status)).inc()
    GATEWAY_SECONDS.labels(app).observe(max(0.0, seconds))


_STORE_READ = STORE_SECONDS.labels("read")
_STORE_WRITE = STORE_SECONDS.labels("write_batch")


def store_op(kind: str, seconds: float) -> None:
    """On the store's writer thread: ``kind`` is ``read`` or ``write_batch``."""
    (_STORE_READ if kind == "read" else _STORE_WRITE).observe(seconds)


# ---------------------------------------------------------------------- state, at scrape time


class StateCollector(Collector):
    """Gauges computed from the control plane's memory when Prometheus scrapes."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cp = self.cp
        queued = GaugeMetricFamily(
            "strato_inputs_queued", "Inputs waiting for a container, by function.", labels=FN
        )
        running = GaugeMetricFamily(
            "strato_inputs_running", "Inputs leased to containers now, by function.", labels=FN
        )
        q: dict[tuple[str, str], int] = {}
        r: dict[tuple[str, str], int] = {}
        for fn in list(cp.calls.functions.values()):
            n_q, n_r = len(fn.queue), cp.calls.inflight(fn)
            if fn.app_state == "stopped" and not (n_q or n_r):
                continue
            key = LABELS.children(fn.function_id).labels
            q[key] = q.get(key, 0) + n_q
            r[key] = r.get(key, 0) + n_r
        for key, n in q.items():
            queued.add_metric(key, n)
            running.add_metric(key, r[key])
        yield queued
        yield running

        containers = GaugeMetricFamily(
            "strato_containers", "Containers this control plane tracks, by state.", labels=["state"]
        )
        by_state: dict[str, int] = {}
        for c in list(cp.containers):
            by_state[str(c.state)] = by_state.get(str(c.state), 0) + 1
        for st in ("starting", "ready", "stopping", "killing"):
            by_state.setdefault(st, 0)
        for st, n in sorted(by_state.items()):
            containers.add_metric([st], n)
        yield containers
        yield from self._nodes()

    def _nodes(self) -> Iterable[GaugeMetricFamily]:
        labels = ["node", "provider"]
        up = GaugeMetricFamily(
            "strato_node_up", "1 while the node's worker agent is connected.", labels=labels
        )
        cpu = GaugeMetricFamily("strato_node_cpu_cores", "CPU cores of a node.", labels=labels)
        cpu_res = GaugeMetricFamily(
            "strato_node_cpu_reserved_cores", "CPU cores reserved by containers.", labels=labels
        )
        mem = GaugeMetricFamily("strato_node_memory_bytes", "Memory of a node.", labels=labels)
        mem_res = GaugeMetricFamily(
            "strato_node_memory_reserved_bytes", "Memory reserved by containers.", labels=labels
        )
        gpus = GaugeMetricFamily(
            "strato_node_gpus", "GPUs of a node, by type.", labels=[*labels, "gpu_type"]
        )
        gpus_used = GaugeMetricFamily(
            "strato_node_gpus_reserved",
            "GPUs of a node assigned to containers, by type.",
            labels=[*labels, "gpu_type"],
        )
        for node in list(self.cp.fleet.nodes.values()):
            v = node.view
            key = [v.node_id, v.provider]
            up.add_metric(key, 1.0 if node.peer is not None else 0.0)
            cpu.add_metric(key, v.cpu_total)
            cpu_res.add_metric(key, v.cpu_reserved)
            mem.add_metric(key, v.memory_mb * 1024 * 1024)
            mem_res.add_metric(key, v.memory_reserved_mb * 1024 * 1024)
            for gpu_type, ids in v.gpus.items():
                gpus.add_metric([*key, gpu_type], len(ids))
                gpus_used.add_metric([*key, gpu_type], len(v.gpus_in_use.intersection(ids)))
        yield from (up, cpu, cpu_res, mem, mem_res, gpus, gpus_used)


class Metrics:
    """The exposition of one control plane: the process's event metrics plus its state."""

    def __init__(self, cp: ControlPlane) -> None:
        self.state = CollectorRegistry(auto_describe=False)
        self.state.register(StateCollector(cp))

    def exposition(self) -> bytes:
        return generate_latest(REGISTRY) + generate_latest(self.state)


def install(cp: ControlPlane) -> Metrics:
    """Wire the hooks' label resolution and the store's timings to ``cp``."""
    names = LABELS.app_names
    try:
        for row in cp.store.apps():
            if row["state"] != "stopped":
                names[row["app_id"]] = web_name(row["workspace"], row["name"]) or row["app_id"]
    except Exception:
        log.exception("metrics: could not read the apps' names")

    def created(info: Any, _specs: Any) -> None:
        # apps outside the default workspace as <workspace>--<name>, as their URLs: two
        # workspaces' apps of one name never share a series
        workspace = cp.apps.app_ws.get(info.app_id, DEFAULT_WORKSPACE)
        names[info.app_id] = web_name(workspace, info.name) or info.app_id

    cp.apps.on_created.append(created)

    def resolve(function_id: str) -> tuple[str, str] | None:
        fn = cp.calls.functions.get(function_id)
        if fn is None:
            return None
        return (names.get(fn.app_id, OTHER), fn.name)

    LABELS.resolve = resolve
    writer = getattr(cp.store, "_writer", None)
    if writer is not None and hasattr(writer, "on_op"):
        writer.on_op = store_op
    return Metrics(cp)
