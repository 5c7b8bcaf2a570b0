"""Routes of Dict and Queue.

Dicts and Queues belong to the workspace, so code in any container may use any of them
by name (``container=True``); deleting a named one and listing them all are for the API
token's holder only. Every answer comes after the change is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from strato import exceptions as exc
from strato import settings
from strato.protocol import messages as m
from strato.server.state import Dicts, Queues
from strato.server.state.db import StateDb
from strato.server.state.queues import MAX_WAIT_S

from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router

log = logging.getLogger("strato.state")
WHAT = ("keys", "values", "items")


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    db = StateDb(cp.store)
    dicts = Dicts(
        db,
        cp.blobs,
        blob_threshold=cp.config.blob_threshold,
        max_payload=cp.config.max_payload,
        ttl_s=settings.DICT_TTL.get(),
    )
    queues = Queues(db)
    route = api.add
    empty = reply({})

    # ---------------------------------------------------------------- both kinds

    for kind, objects, base in (
        ("Dict", dicts.objects, "/dicts"),
        ("Queue", queues.objects, "/queues"),
    ):
        _register_objects(api, kind, objects, base, queues if kind == "Queue" else None)

    # ---------------------------------------------------------------- Dict

    @route(
        "POST",
        "/dicts/{object_id}/get",
        "A Dict entry's value",
        body=m.DictKey,
        response=m.DictValue,
        container=True,
        access="read",  # a POST that changes nothing
    )
    async def dict_get(req: Request) -> Reply:
        key = req.decode(m.DictKey).key
        return reply(await dicts.get(req.path_params["object_id"], key))

    @route(
        "POST",
        "/dicts/{object_id}/contains",
        "Whether a Dict has a key",
        body=m.DictKey,
        response=m.DictValue,
        container=True,
        access="read",  # a POST that changes nothing
    )
    async def dict_contains(req: Request) -> Reply:
        found = await dicts.get(req.path_params["object_id"], req.decode(m.DictKey).key)
        return reply(m.DictValue(found.found))

    @route(
        "POST",
        "/dicts/{object_id}/put",
        "Store Dict entries",
        body=m.DictPut,
        response=m.StateCount,
        container=True,
    )
    async def dict_put(req: Request) -> Reply:
        n = await dicts.put(req.path_params["object_id"], req.decode(m.DictPut))
        return reply(m.StateCount(n))

    @route(
        "POST",
        "/dicts/{object_id}/pop",
        "Remove a Dict entry and return its value",
        body=m.DictKey,
        response=m.DictValue,
        container=True,
    )
    async def dict_pop(req: Request) -> Reply:
        return reply(await dicts.pop(req.path_params["object_id"], req.decode(m.DictKey).key))

    @route(
        "GET",
        "/dicts/{object_id}/len",
        "How many entries a Dict has",
        response=m.StateCount,
        container=True,
    )
    async def dict_len(req: Request) -> Reply:
        return reply(m.StateCount(await dicts.length(req.path_params["object_id"])))

    @route("POST", "/dicts/{object_id}/clear", "Remove every entry of a Dict", container=True)
    async def dict_clear(req: Request) -> Reply:
        await dicts.clear(req.path_params["object_id"])
        return empty

    @route(
        "GET",
        "/dicts/{object_id}/entries",
        "A page of a Dict's keys, values or items",
        response=m.DictPage,
        query={"after": int, "limit": int, "what": str},
        container=True,
    )
    async def dict_entries(req: Request) -> Reply:
        what = req.param("what", str, "items")
        if what not in WHAT:
            raise exc.InvalidError(f"what={what!r}: use one of {', '.join(WHAT)}")
        page = await dicts.page(
            req.path_params["object_id"],
            req.param("after", int, 0),
            req.param("limit", int, 1000),
            what,
        )
        return reply(page)

    # ---------------------------------------------------------------- Queue

    @route(
        "POST",
        "/queues/{object_id}/put",
        "Put items into a Queue partition (waits for room up to the body's timeout)",
        body=m.QueuePut,
        response=m.QueuePutResult,
        container=True,
    )
    async def queue_put(req: Request) -> Reply:
        return reply(await queues.put(req.path_params["object_id"], req.decode(m.QueuePut)))

    @route(
        "POST",
        "/queues/{object_id}/get",
        "Take up to n items from a Queue partition (a long-poll up to the body's timeout)",
        body=m.QueueGet,
        response=m.QueueItems,
        container=True,
    )
    async def queue_get(req: Request) -> Reply:
        return reply(await queues.get(req.path_params["object_id"], req.decode(m.QueueGet)))

    @route(
        "GET",
        "/queues/{object_id}/len",
        "How many items a Queue partition (or the whole Queue) holds",
        response=m.StateCount,
        query={"partition": str, "total": int},
        container=True,
    )
    async def queue_len(req: Request) -> Reply:
        n = await queues.length(
            req.path_params["object_id"],
            req.param("partition", str, ""),
            bool(req.param("total", int, 0)),
        )
        return reply(m.StateCount(n))

    @route(
        "POST",
        "/queues/{object_id}/clear",
        "Remove the items of a partition (or all)",
        body=m.QueueClear,
        container=True,
    )
    async def queue_clear(req: Request) -> Reply:
        await queues.clear(req.path_params["object_id"], req.decode(m.QueueClear))
        return empty

    @route(
        "GET",
        "/queues/{object_id}/items",
        "Items after a cursor, not removed (a long-poll up to timeout)",
        response=m.QueueItems,
        query={"partition": str, "after": int, "timeout": float},
        container=True,
    )
    async def queue_items(req: Request) -> Reply:
        items = await queues.peek(
            req.path_params["object_id"],
            req.param("partition", str, ""),
            req.param("after", int, 0),
            min(req.param("timeout", float, 0.0), MAX_WAIT_S),
        )
        return reply(items)

    cp.spawn_loop(_expiry_loop(db, dicts, queues), "state-expiry")


def _register_objects(api: Router, kind: str, objects, base: str, queues: Queues | None) -> None:
    route = api.add
    empty = reply({})
    noun = kind.lower()

    async def lookup(req: Request) -> Reply:
        body = req.decode(m.StateLookup)
        return reply(await objects.lookup(body.name, body.create_if_missing, req.caller.workspace))

    async def ephemeral(req: Request) -> Reply:
        return reply(await objects.ephemeral(req.caller.workspace))

    async def heartbeat(req: Request) -> Reply:
        await objects.heartbeat(req.path_params["object_id"])
        return empty

    async def delete_id(req: Request) -> Reply:
        object_id = req.path_params["object_id"]
        await objects.delete_id(object_id, named_ok=req.principal is None)
        if queues is not None:
            queues.deleted(object_id)
        return empty

    async def delete_name(req: Request) -> Reply:
        object_id = await objects.delete_name(req.decode(m.StateLookup).name, req.caller.workspace)
        if queues is not None:
            queues.deleted(object_id)
        return empty

    async def list_all(req: Request) -> Reply:
        return reply(await objects.list_all(req.caller.workspace))

    async def owned(req: Request, object_id: str) -> None:  # --- workspaces
        await objects.check_workspace(req.caller.workspace, object_id)

    api.guard(f"{base}/", "object_id", owned)  # another workspace's: as a missing one

    for fn in (lookup, ephemeral, heartbeat, delete_id, delete_name, list_all):
        fn.__name__ = f"{noun}_{fn.__name__}"
    route(
        "POST",
        f"{base}/lookup",
        f"Find a {kind} by name (or create it)",
        body=m.StateLookup,
        response=m.StateRef,
        container=True,
    )(lookup)
    route(
        "POST",
        f"{base}/ephemeral",
        f"Create an ephemeral {kind}",
        response=m.StateRef,
        container=True,
    )(ephemeral)
    route("POST", f"{base}/{{object_id}}/heartbeat", f"Keep an ephemeral {kind}", container=True)(
        heartbeat
    )
    route(
        "DELETE",
        f"{base}/{{object_id}}",
        f"Delete a {kind} by id (from a container: an ephemeral one only)",
        container=True,
    )(delete_id)
    route("POST", f"{base}/delete", f"Delete a named {kind} and its contents", body=m.StateLookup)(
        delete_name
    )
    route("GET", base, f"Every {kind}", response=m.StateList)(list_all)


async def _expiry_loop(db: StateDb, dicts: Dicts, queues: Queues) -> None:
    """Delete Dict entries past their TTL, Queue partitions past theirs, and ephemeral
    Dicts and Queues whose client stopped heartbeating."""
    every_s = max(0.05, min(60.0, dicts.ttl_s / 4))
    while True:
        await asyncio.sleep(every_s)
        now = time.time()
        try:
            n_entries = await db.run("Dict expiry", dicts.expire_op(now))
            n_parts = await db.run("Queue expiry", queues.expire_op(now))
            gone = await dicts.objects.expire_ephemeral(now)
            gone_q = await queues.objects.expire_ephemeral(now)
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.warning("state expiry failed (next round tries again): %s", e)
            continue
        for qid in gone_q:
            queues.deleted(qid)
        if n_entries or n_parts or gone or gone_q:
            log.info(
                "expired %d Dict entries, %d Queue partitions, %d ephemeral Dicts and "
                "%d ephemeral Queues",
                n_entries,
                n_parts,
                len(gone),
                len(gone_q),
            )
