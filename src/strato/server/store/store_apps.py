"""The apps, functions and mounts, and the nodes, containers and logs, of `Store`: the
control plane's fleet tables. :class:`StoreApps` is a base of
:class:`~strato.server.store.store.Store`; its state is declared in `store_tables.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, and_, select, update

from . import schema as t
from .store_tables import StoreTables, run_statement
from .writer import Write


class StoreApps(StoreTables):
    """The apps' and the fleet's tables' methods (a base of ``Store``)."""

    # ------------------------------------------------------------------ apps

    def create_app(
        self,
        app_id: str,
        name: str | None,
        state: str,
        functions: Sequence[tuple[str, str, bytes]],
        mount: tuple[str, bytes] | None,
        replace_deployed: bool,
        workspace: str = "main",
    ) -> list[str]:
        """Insert an app and its functions. With ``replace_deployed``, an earlier deployed
        app of the same name (in its workspace) is stopped in the same transaction; returns
        the ids of the apps it stopped. Blocks until committed (`queue_create_app` does
        not)."""
        return self.queue_create_app(
            app_id, name, state, functions, mount, replace_deployed, workspace
        ).wait()

    def queue_create_app(
        self,
        app_id: str,
        name: str | None,
        state: str,
        functions: Sequence[tuple[str, str, bytes]],
        mount: tuple[str, bytes] | None,
        replace_deployed: bool,
        workspace: str = "main",
    ) -> Write[list[str]]:
        now = time.time()
        functions = list(functions)

        def run(c: Connection) -> list[str]:
            stopped: list[str] = []
            if replace_deployed and name:
                rows = c.execute(
                    select(t.apps.c.app_id).where(
                        and_(
                            t.apps.c.name == name,
                            t.apps.c.state == "deployed",
                            t.apps.c.workspace == workspace,
                        )
                    )
                ).all()
                stopped = [r[0] for r in rows]
                if stopped:
                    c.execute(
                        update(t.apps)
                        .where(t.apps.c.app_id.in_(stopped))
                        .values(state="stopped", stopped_at=now)
                    )
            c.execute(
                t.apps.insert().values(
                    app_id=app_id, name=name, state=state, created_at=now, workspace=workspace
                )
            )
            if functions:
                c.execute(
                    t.functions.insert(),
                    [
                        {
                            "function_id": fid,
                            "app_id": app_id,
                            "name": fname,
                            "spec": spec,
                            "created_at": now,
                        }
                        for fid, fname, spec in functions
                    ],
                )
            if (
                mount is not None
                and not c.execute(
                    select(t.mounts.c.mount_id).where(t.mounts.c.mount_id == mount[0])
                ).first()
            ):
                c.execute(
                    t.mounts.insert().values(mount_id=mount[0], manifest=mount[1], created_at=now)
                )
            return stopped

        return self._write("create_app", run)

    def set_app_state(self, app_id: str, state: str) -> Write[None]:
        stopped_at = time.time() if state == "stopped" else None

        def run(c: Connection) -> None:
            c.execute(
                update(t.apps)
                .where(t.apps.c.app_id == app_id)
                .values(state=state, stopped_at=stopped_at)
            )

        return self._write("set_app_state", run)

    def apps(self, app_ids: Iterable[str] | None = None) -> list[dict]:
        q = select(t.apps).order_by(t.apps.c.created_at)
        if app_ids is not None:
            q = q.where(t.apps.c.app_id.in_(list(app_ids)))
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def find_app(self, name: str, workspace: str = "main") -> dict | None:
        """The deployed app of that name in ``workspace``, else the newest running
        ephemeral one."""
        q = (
            select(t.apps)
            .where(
                and_(
                    t.apps.c.name == name,
                    t.apps.c.state != "stopped",
                    t.apps.c.workspace == workspace,
                )
            )
            .order_by(t.apps.c.created_at.desc())
        )
        rows = [dict(r._mapping) for r in self._read(lambda c: c.execute(q).all())]
        deployed = [r for r in rows if r["state"] == "deployed"]
        return (deployed or rows)[0] if rows else None

    def functions_of(self, app_id: str) -> list[dict]:
        q = select(t.functions).where(t.functions.c.app_id == app_id)
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def function(self, function_id: str) -> dict | None:
        q = (
            select(t.functions, t.apps.c.state.label("app_state"))
            .join(t.apps, t.apps.c.app_id == t.functions.c.app_id)
            .where(t.functions.c.function_id == function_id)
        )
        r = self._read(lambda c: c.execute(q).first())
        return dict(r._mapping) if r else None

    def add_function(self, app_id: str, function_id: str, name: str, spec: bytes) -> Write[None]:
        stmt = t.functions.insert().values(
            function_id=function_id, app_id=app_id, name=name, spec=spec, created_at=time.time()
        )
        return self._write("add_function", run_statement(stmt))

    def update_function_spec(self, function_id: str, spec: bytes) -> Write[None]:
        stmt = update(t.functions).where(t.functions.c.function_id == function_id).values(spec=spec)
        return self._write("update_function_spec", run_statement(stmt))

    def mount(self, mount_id: str) -> bytes | None:
        q = select(t.mounts.c.manifest).where(t.mounts.c.mount_id == mount_id)
        return self._read(lambda c: c.execute(q).scalar())

    # ------------------------------------------------------------------ nodes, containers, logs

    def upsert_node(
        self, node_id: str, name: str, provider: str, info: bytes, state: str
    ) -> Write[None]:
        values = dict(
            name=name, provider=provider, info=info, state=state, last_heartbeat=time.time()
        )

        def run(c: Connection) -> None:
            exists = c.execute(
                select(t.nodes.c.node_id).where(t.nodes.c.node_id == node_id)
            ).first()
            if exists:
                c.execute(update(t.nodes).where(t.nodes.c.node_id == node_id).values(**values))
            else:
                c.execute(t.nodes.insert().values(node_id=node_id, **values))

        return self._write("upsert_node", run)

    def set_node_state(self, node_id: str, state: str) -> Write[None]:
        stmt = update(t.nodes).where(t.nodes.c.node_id == node_id).values(state=state)
        return self._write("set_node_state", run_statement(stmt))

    def insert_container(self, row: dict) -> Write[None]:
        stmt = t.containers.insert().values(**row)
        return self._write("insert_container", run_statement(stmt))

    def set_container_state(
        self, container_id: str, state: str, exit_reason: str | None = None
    ) -> Write[None]:
        values: dict = {"state": state}
        if state in ("stopped", "failed"):
            values["stopped_at"] = time.time()
        if exit_reason is not None:
            values["exit_reason"] = exit_reason
        stmt = (
            update(t.containers).where(t.containers.c.container_id == container_id).values(**values)
        )
        return self._write("set_container_state", run_statement(stmt))

    def stop_live_containers(self, reason: str) -> list[str]:
        """Mark every container not yet stopped as stopped (at start: an earlier epoch's).
        Blocks until committed (`queue_stop_live_containers` does not)."""
        return self.queue_stop_live_containers(reason).wait()

    def queue_stop_live_containers(self, reason: str) -> Write[list[str]]:
        now = time.time()

        def run(c: Connection) -> list[str]:
            ids = [
                r[0]
                for r in c.execute(
                    select(t.containers.c.container_id).where(
                        t.containers.c.state.notin_(["stopped", "failed"])
                    )
                )
            ]
            if ids:
                c.execute(
                    update(t.containers)
                    .where(t.containers.c.container_id.in_(ids))
                    .values(state="stopped", stopped_at=now, exit_reason=reason)
                )
            return ids

        return self._write("stop_live_containers", run)

    def containers(self, app_id: str | None = None, live_only: bool = True) -> list[dict]:
        q = select(t.containers).order_by(t.containers.c.started_at)
        if app_id:
            q = q.where(t.containers.c.app_id == app_id)
        if live_only:
            q = q.where(t.containers.c.state.notin_(["stopped", "failed"]))
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def nodes(self) -> list[dict]:
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(select(t.nodes))])

    def add_logs(self, rows: list[dict]) -> Write[None]:
        if not rows:
            return self._done("add_logs")
        return self._write_many("add_logs", self.q.insert_logs, list(rows))

    def logs_after(self, app_id: str, after: int, limit: int = 1000) -> list[dict]:
        params = {"app_id": app_id, "after": after, "limit": limit}
        return self._read(
            lambda c: [dict(r._mapping) for r in c.execute(self.q.logs_after, params)]
        )
