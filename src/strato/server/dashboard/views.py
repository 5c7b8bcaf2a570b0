"""What the dashboard's pages show: read from the control plane's memory (functions,
queues, containers, nodes) and its store (apps, calls, inputs, logs), never changed
here except by the two actions (stop an app, stop a container)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import desc, func, select

from strato.exceptions import NotFoundError

from .. import metrics
from ..api.router import Request as ApiRequest
from ..store import schema as t
from ..workspaces import Caller

if TYPE_CHECKING:
    from ..control import ControlPlane

RECENT_CALLS = 25
RECENT_WINDOW_S = 3600.0  # recent calls: of the last hour (read through expires_at's index)
MAX_INPUTS = 500
TAIL_LINES = 200
# GET routes of other features whose lists the dashboard shows, where the tree has them:
# path -> (title, the field of the reply that lists them)
OBJECT_LISTS = {
    "/dicts": ("Dicts", "objects"),
    "/queues": ("Queues", "objects"),
    "/secrets": ("Secrets", "secrets"),
    "/volumes": ("Volumes", "volumes"),
    "/sandboxes": ("Sandboxes", "sandboxes"),
}


@dataclass
class FunctionView:
    function_id: str
    name: str
    web_url: str | None
    queued: int
    running: int
    containers: int
    succeeded: int
    failed: int


async def query(cp: ControlPlane, run: Any) -> Any:
    """Run ``run(connection)`` on the store's writer thread (after the writes before it)."""
    store = cp.store
    return await store.aread(store._read, run)


def ago(ts: float | None) -> str:
    """A wall-clock time as the page shows it (absolute: a live fragment that said "5s
    ago" would change every second, and be sent again every second)."""
    if not ts:
        return "-"
    if time.time() - ts < 86400:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _ended(labels: tuple[str, str]) -> tuple[int, int]:
    ok = failed = 0
    for fam in metrics.INPUTS.collect():
        for s in fam.samples:
            if (
                s.name.endswith("_total")
                and s.labels["app"] == labels[0]
                and s.labels["function"] == labels[1]
            ):
                if s.labels["status"] == "success":
                    ok += int(s.value)
                elif s.labels["status"] != "cancelled":
                    failed += int(s.value)
    return ok, failed


def ended_count(function_id: str) -> float:
    """Inputs of the function (its labels) that ended, any status (from the counters)."""
    c = metrics.LABELS.children(function_id)
    return sum(counter._value.get() for counter in c.inputs.values())


async def apps(cp: ControlPlane) -> list[dict]:
    rows = await cp.store.aread(cp.store.apps)
    live = [r for r in rows if r["state"] != "stopped"]
    stopped = sorted(
        (r for r in rows if r["state"] == "stopped"),
        key=lambda r: r["stopped_at"] or 0,
        reverse=True,
    )[:20]
    out = []
    for r in sorted(live, key=lambda r: r["created_at"], reverse=True) + stopped:
        info = cp.apps.info(r)
        deployments = sum(1 for x in rows if r["name"] and x["name"] == r["name"])
        out.append(
            {
                "app_id": info.app_id,
                "name": info.name or "(unnamed)",
                "state": str(info.state),
                "created": ago(info.created_at),
                "functions": len(info.functions),
                "containers": info.n_containers,
                "deployments": deployments,
                "urls": [(f.name, f.web_url) for f in info.functions if f.web_url],
            }
        )
    return out


async def app(cp: ControlPlane, app_id: str) -> dict:
    rows = await cp.store.aread(cp.store.apps, [app_id])
    if not rows:
        raise NotFoundError(f"no app {app_id}")
    row = rows[0]
    info = cp.apps.info(row)
    fns = []
    for ref in info.functions:
        try:
            fn = cp.calls.function(ref.function_id)
        except NotFoundError:
            continue
        ok, failed = _ended(metrics.LABELS.children(fn.function_id).labels)
        fns.append(
            FunctionView(
                fn.function_id,
                fn.name,
                ref.web_url,
                len(fn.queue),
                cp.calls.inflight(fn),
                len(cp.fleet.live_containers_of(fn.function_id)),
                ok,
                failed,
            )
        )
    history = []
    if row["name"]:
        every = await cp.store.aread(cp.store.apps)
        history = sorted(
            (
                {"app_id": r["app_id"], "state": r["state"], "created": ago(r["created_at"])}
                for r in every
                if r["name"] == row["name"]
            ),
            key=lambda h: h["app_id"] != app_id,
        )
    return {
        "app_id": app_id,
        "name": info.name or "(unnamed)",
        "state": str(info.state),
        "created": ago(info.created_at),
        "functions": fns,
        "history": history,
    }


async def recent_calls(cp: ControlPlane, function_ids: list[str]) -> list[dict]:
    if not function_ids:
        return []
    names = {}
    for fid in function_ids:
        try:
            names[fid] = cp.calls.function(fid).name
        except NotFoundError:
            names[fid] = "?"

    # a call expires retention_s after its creation: its index bounds the rows read
    since = time.time() + cp.config.output_retention_s - RECENT_WINDOW_S

    def run(c: Any) -> list[tuple[Any, dict]]:
        calls = c.execute(
            select(
                t.calls.c.call_id,
                t.calls.c.function_id,
                t.calls.c.kind,
                t.calls.c.n_inputs,
                t.calls.c.cancelled,
                t.calls.c.created_at,
            )
            .where(t.calls.c.expires_at > since, t.calls.c.function_id.in_(function_ids))
            .order_by(desc(t.calls.c.created_at))
            .limit(RECENT_CALLS)
        ).all()
        counts: dict[str, dict] = {call.call_id: {} for call in calls}
        if counts:  # one grouped read for all of them (this runs on the store's writer)
            for call_id, status, n in c.execute(
                select(t.inputs.c.call_id, t.inputs.c.out_status, func.count())
                .where(t.inputs.c.call_id.in_(list(counts)))
                .group_by(t.inputs.c.call_id, t.inputs.c.out_status)
            ).all():
                counts[call_id][status] = n
        return [(call, counts[call.call_id]) for call in calls]

    rows = await query(cp, run)
    out = []
    for call, counts in rows:
        done = sum(n for s, n in counts.items() if s is not None)
        failed = sum(n for s, n in counts.items() if s not in (None, "success"))
        status = (
            "cancelled"
            if call.cancelled
            else "pending"
            if done < call.n_inputs
            else "failure"
            if failed
            else "success"
        )
        out.append(
            {
                "call_id": call.call_id,
                "function": names.get(call.function_id, "?"),
                "kind": call.kind,
                "inputs": call.n_inputs,
                "done": done,
                "failed": failed,
                "status": status,
                "created": ago(call.created_at),
            }
        )
    return out


async def call(cp: ControlPlane, call_id: str) -> dict:
    def run(c: Any) -> tuple[Any, list[Any]]:
        row = c.execute(select(t.calls).where(t.calls.c.call_id == call_id)).first()
        if row is None:
            return None, []
        inputs = c.execute(
            select(
                t.inputs.c.input_id,
                t.inputs.c.idx,
                t.inputs.c.status,
                t.inputs.c.attempts,
                t.inputs.c.out_status,
                t.inputs.c.error,
                t.inputs.c.error_type,
                t.inputs.c.traceback,
                t.inputs.c.done_at,
            )
            .where(t.inputs.c.call_id == call_id)
            .order_by(t.inputs.c.idx)
            .limit(MAX_INPUTS)
        ).all()
        return row, inputs

    row, inputs = await query(cp, run)
    if row is None:
        raise NotFoundError(f"call {call_id} does not exist (or has expired)")
    try:
        fn = cp.calls.function(row.function_id)
        fname, app_id = fn.name, fn.app_id
    except NotFoundError:
        fname, app_id = "?", ""
    where: dict[int, str] = {}
    for p in cp.calls.live.get(call_id, {}).values():
        where[p.input_id] = str(p.where)
    return {
        "call_id": call_id,
        "function": fname,
        "function_id": row.function_id,
        "app_id": app_id,
        "kind": row.kind,
        "n_inputs": row.n_inputs,
        "cancelled": row.cancelled,
        "created": ago(row.created_at),
        "inputs": [
            {
                "idx": i.idx,
                "status": i.out_status or where.get(i.input_id, "pending"),
                "retries": i.attempts,
                "error_type": i.error_type or "",
                "error": i.error or "",
                "traceback": i.traceback or "",
                "took": (
                    f"{max(0.0, i.done_at - row.created_at):.3f}s" if i.done_at is not None else ""
                ),
            }
            for i in inputs
        ],
    }


def _container_view(cp: ControlPlane, c: Any, now: float) -> dict:
    try:
        fn = cp.calls.function(c.function_id)
        fname = fn.name
    except NotFoundError:
        fname = "?"
    cold = metrics.COLD_START_OF.get(c.container_id)
    return {
        "container_id": c.container_id,
        "app_id": c.app_id,
        "function": fname,
        "node_id": c.node_id,
        "state": str(c.state),
        "age": ago(time.time() - (now - c.started_at)),
        "cold_start": f"{cold:.2f}s" if cold is not None else "-",
        "cpu": f"{c.request.cpu:g}",
        "memory_mb": c.request.memory_mb,
        "inflight": len(c.inflight),
    }


def containers(cp: ControlPlane) -> list[dict]:
    now = time.monotonic()
    return [
        _container_view(cp, c, now)
        for c in sorted(cp.containers, key=lambda c: c.started_at, reverse=True)
    ]


async def container(cp: ControlPlane, container_id: str) -> dict:
    c = cp.fleet.container(container_id)
    if c is not None:
        return _container_view(cp, c, time.monotonic())
    rows = await query(
        cp,
        lambda conn: conn.execute(
            select(t.containers).where(t.containers.c.container_id == container_id)
        ).first(),
    )
    if rows is None:
        raise NotFoundError(f"no container {container_id}")
    return {
        "container_id": container_id,
        "app_id": rows.app_id,
        "function": "?",
        "node_id": rows.node_id,
        "state": rows.state,
        "age": ago(rows.started_at),
        "cold_start": "-",
        "cpu": "-",
        "memory_mb": "-",
        "inflight": 0,
        "exit_reason": rows.exit_reason or "",
    }


def nodes(cp: ControlPlane) -> list[dict]:
    out = []
    for n in cp.fleet.nodes.values():
        v = n.view
        gpus = sum(len(ids) for ids in v.gpus.values())
        out.append(
            {
                "node_id": v.node_id,
                "name": n.info.name,
                "provider": v.provider,
                "region": v.region or "-",
                "state": "ready" if n.peer is not None else "lost",
                "cpu_total": v.cpu_total,
                "cpu_reserved": round(v.cpu_reserved, 2),
                "cpu_pct": round(100 * v.cpu_reserved / v.cpu_total) if v.cpu_total else 0,
                "mem_total": v.memory_mb,
                "mem_reserved": v.memory_reserved_mb,
                "mem_pct": round(100 * v.memory_reserved_mb / v.memory_mb) if v.memory_mb else 0,
                "gpus": ", ".join(f"{k}×{len(ids)}" for k, ids in v.gpus.items()) or "none",
                "gpus_used": len(v.gpus_in_use),
                "gpus_total": gpus,
                "containers": sum(1 for c in cp.containers if c.node_id == v.node_id),
                "heartbeat": _heartbeat(time.monotonic() - n.last_heartbeat),
            }
        )
    return out


def _heartbeat(silent_s: float) -> str:
    return "recent" if silent_s < 15 else f"silent for {silent_s:.0f}s"


async def log_tail(cp: ControlPlane, app_id: str, container_id: str | None) -> tuple[list, int]:
    """The last lines of an app's logs (of one container, if given), and the last seq."""

    def run(c: Any) -> list[Any]:
        q = select(t.logs).where(t.logs.c.app_id == app_id)
        if container_id:
            q = q.where(t.logs.c.container_id == container_id)
        return c.execute(q.order_by(desc(t.logs.c.seq)).limit(TAIL_LINES)).all()

    rows = list(reversed(await query(cp, run)))

    def last_seq(c: Any) -> int:
        return (
            c.execute(select(func.max(t.logs.c.seq)).where(t.logs.c.app_id == app_id)).scalar() or 0
        )

    return rows, await query(cp, last_seq)


def object_routes(cp: ControlPlane) -> list[tuple[str, str]]:
    """(path, title) of the object lists this tree serves."""
    if cp.api is None:
        return []
    have = {r.path for r in cp.api.routes if r.method == "GET"}
    return [(p, title) for p, (title, _) in OBJECT_LISTS.items() if p in have]


async def objects(cp: ControlPlane, path: str, caller: Caller) -> list[dict]:
    """Another feature's list (its own GET route, answered by its own handler for
    ``caller``: its workspace's)."""
    assert cp.api is not None
    route = next(r for r in cp.api.routes if r.method == "GET" and r.path == path)
    reply = await route.handler(ApiRequest({}, {}, b"", caller=caller))
    data = msgspec.msgpack.decode(reply.body)
    items = data.get(OBJECT_LISTS[path][1], []) if isinstance(data, dict) else []
    out = []
    for it in items:
        if isinstance(it, dict):
            out.append(
                {
                    k: ago(v) if k.endswith("_at") and isinstance(v, int | float) else v
                    for k, v in it.items()
                    if not isinstance(v, bytes | dict | list)
                }
            )
        elif isinstance(it, list):  # array-like structs
            out.append({str(i): v for i, v in enumerate(it) if not isinstance(v, bytes)})
    return out
