"""What Dicts and Queues share: find or create one by name, make an ephemeral one (kept
while its client heartbeats), delete one, list them."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, Table, bindparam, delete, select, update

from strato import exceptions as exc
from strato.protocol import messages as m

from ..store.tables_workspaces import DEFAULT_WORKSPACE
from .db import StateDb
from .names import check_id, check_name, new_id

EPHEMERAL_TIMEOUT_S = 300.0  # an ephemeral object without a heartbeat this long is deleted
OWNERS_KEPT = 100_000  # workspaces of objects remembered (then forgotten all at once)


class NamedObjects:
    """The rows of one kind (``Dict`` or ``Queue``): ``table`` has ``<id_col>``, ``name``,
    ``created_at`` and ``heartbeat_at``; ``children`` are the tables of its contents,
    each with ``<id_col>``."""

    KNOWN_MAX = 100_000  # ids remembered as existing (forgotten all at once past this)

    def __init__(self, kind: str, db: StateDb, table: Table, children: list[Table]) -> None:
        self.kind = kind
        self.db = db
        self.table = table
        self.children = children
        self.id_col = table.c[table.primary_key.columns.keys()[0]]
        self._exists = select(self.id_col).where(self.id_col == bindparam("object_id"))
        # ids found in the store, so that a hot operation does not look again (writer
        # thread only: every deletion runs there too, in ``_drop``, which forgets them)
        self._known: set[str] = set()
        # told when a deletion is queued, and which objects it deleted (the Dict cache)
        self.changing: Callable[[], None] = lambda: None
        self.deleted: Callable[[list[str]], None] = lambda ids: None
        self._owner = select(table.c.workspace).where(self.id_col == bindparam("object_id"))
        self._owners: dict[str, str] = {}  # object id -> workspace (it never changes)

    # ------------------------------------------------------------------ writer-thread parts

    def exists(self, c: Connection, object_id: str) -> None:
        """Raise `NotFoundError` unless the object exists (run inside an operation)."""
        if object_id in self._known:
            return
        if c.execute(self._exists, {"object_id": object_id}).first() is None:
            raise exc.NotFoundError(
                f"{self.kind} {object_id} does not exist (it was deleted, or it was "
                "ephemeral and its owner stopped)"
            )
        if len(self._known) >= self.KNOWN_MAX:
            self._known.clear()
        self._known.add(object_id)

    def _drop(self, c: Connection, ids: list[str]) -> None:
        self._known.difference_update(ids)
        for child in self.children:
            c.execute(delete(child).where(child.c[self.id_col.name].in_(ids)))
        c.execute(delete(self.table).where(self.id_col.in_(ids)))

    # ------------------------------------------------------------------ operations

    async def check_workspace(self, workspace: str, object_id: str) -> None:
        """Raise `NotFoundError` unless the object belongs to ``workspace``: the same
        answer as for a missing one. Kept once read, so a hot Dict or Queue costs one
        dict lookup."""
        ws = self._owners.get(object_id)
        if ws is None:
            row = await self.db.read(
                f"{self.kind} owner",
                lambda c: c.execute(self._owner, {"object_id": object_id}).first(),
            )
            if row is not None:
                if len(self._owners) >= OWNERS_KEPT:
                    self._owners.clear()
                ws = self._owners[object_id] = row[0]
        if ws != workspace:
            raise exc.NotFoundError(
                f"{self.kind} {object_id} does not exist (it was deleted, or it was "
                "ephemeral and its owner stopped)"
            )

    async def lookup(
        self, name: str, create_if_missing: bool, workspace: str = DEFAULT_WORKSPACE
    ) -> m.StateRef:
        name = check_name(self.kind, name)
        t = self.table

        def run(c: Connection) -> str:
            where = (t.c.name == name) & (t.c.workspace == workspace)
            row = c.execute(select(self.id_col).where(where)).first()
            if row is not None:
                return row[0]
            if not create_if_missing:
                raise exc.NotFoundError(
                    f"no {self.kind} named {name!r}: create it with "
                    f"{self.kind}.from_name({name!r}, create_if_missing=True)"
                )
            object_id = new_id(self.kind)
            c.execute(
                t.insert().values(
                    {
                        self.id_col.name: object_id,
                        "name": name,
                        "created_at": time.time(),
                        "workspace": workspace,
                    }
                )
            )
            return object_id

        return m.StateRef(await self.db.run(f"{self.kind} lookup", run), name)

    async def ephemeral(self, workspace: str = DEFAULT_WORKSPACE) -> m.StateRef:
        object_id = new_id(self.kind)
        now = time.time()
        row = {
            self.id_col.name: object_id,
            "name": None,
            "created_at": now,
            "heartbeat_at": now,
            "workspace": workspace,
        }
        await self.db.run(f"{self.kind} ephemeral", lambda c: c.execute(self.table.insert(), row))
        return m.StateRef(object_id, None)

    async def heartbeat(self, object_id: str) -> None:
        check_id(self.kind, object_id)

        def run(c: Connection) -> None:
            self.exists(c, object_id)
            c.execute(
                update(self.table)
                .where(self.id_col == object_id, self.table.c.name.is_(None))
                .values(heartbeat_at=time.time())
            )

        await self.db.run(f"{self.kind} heartbeat", run)

    async def delete_id(self, object_id: str, *, named_ok: bool) -> None:
        """Delete by id: an ephemeral object, or (``named_ok``) a named one too."""
        check_id(self.kind, object_id)

        def run(c: Connection) -> None:
            row = c.execute(select(self.table.c.name).where(self.id_col == object_id)).first()
            if row is None:
                return  # deleted already: deleting is idempotent
            if row[0] is not None and not named_ok:
                raise exc.AuthError(
                    f"{self.kind} {row[0]!r} is a named {self.kind}: delete it with "
                    f"{self.kind}.delete({row[0]!r}) from outside a container"
                )
            self._drop(c, [object_id])

        self.changing()
        await self.db.run(f"{self.kind} delete", run)
        self.deleted([object_id])

    async def delete_name(self, name: str, workspace: str = DEFAULT_WORKSPACE) -> str:
        """Delete a named object of ``workspace`` and its contents; returns its id."""
        name = check_name(self.kind, name)
        t = self.table

        def run(c: Connection) -> str:
            where = (t.c.name == name) & (t.c.workspace == workspace)
            row = c.execute(select(self.id_col).where(where)).first()
            if row is None:
                raise exc.NotFoundError(f"no {self.kind} named {name!r}")
            self._drop(c, [row[0]])
            return row[0]

        self.changing()
        object_id = await self.db.run(f"{self.kind} delete", run)
        self.deleted([object_id])
        return object_id

    async def list_all(self, workspace: str = DEFAULT_WORKSPACE) -> m.StateList:
        t = self.table

        def run(c: Connection) -> list[m.StateRef]:
            q = select(self.id_col, t.c.name).where(t.c.workspace == workspace)
            rows = c.execute(q.order_by(t.c.created_at)).all()
            return [m.StateRef(r[0], r[1]) for r in rows]

        return m.StateList(await self.db.read(f"{self.kind} list", run))

    async def expire_ephemeral(self, now: float) -> list[str]:
        """Delete ephemeral objects whose heartbeat stopped; returns their ids."""
        self.changing()
        ids = await self.db.run(f"{self.kind} expiry", self.expire_ephemeral_op(now))
        self.deleted(ids)
        return ids

    def expire_ephemeral_op(self, now: float) -> Callable[[Connection], list[str]]:
        """An operation deleting ephemeral objects whose heartbeat stopped; returns ids."""

        def run(c: Connection) -> list[str]:
            t = self.table
            ids = [
                r[0]
                for r in c.execute(
                    select(self.id_col).where(
                        t.c.name.is_(None), t.c.heartbeat_at < now - EPHEMERAL_TIMEOUT_S
                    )
                ).all()
            ]
            if ids:
                self._drop(c, ids)
            return ids

        return run
