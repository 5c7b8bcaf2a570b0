"""Apps: create (ephemeral or deployed, replacing an earlier deployment of that name),
bind a class's parameter set or an options variant to a function of its own, change a
function's scaling, and stop; an ephemeral app whose client falls silent is stopped."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec

from strato.exceptions import InvalidError, NotFoundError
from strato.protocol import messages as m
from strato.protocol.mounts import encode_manifest, mount_id, validate_manifest

from .calls.manager import CallManager
from .calls.specs import check_spec
from .calls.state import AppState
from .fleet import Fleet
from .gateway import Gateway
from .gateway.routes import web_name
from .logs import LogHub
from .scaling import Scaler
from .scheduler.quota import AppQuota
from .store import Store
from .store.blobs import BlobStore
from .store.tables_workspaces import DEFAULT_WORKSPACE

log = logging.getLogger("strato.control")

# what `with_options` / `with_concurrency` / `with_batching` may change in a variant (never
# its code, mount or image: those belong to the app that deployed it)
BINDABLE = frozenset(
    {
        "resources",
        "timeout",
        "retries",
        "env",
        "scaling",
        "runtime",
        "max_inputs",
        "target_inputs",
        "batch_max_size",
        "batch_wait_ms",
        "block_network",
    }
)


class Apps:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        calls: CallManager,
        fleet: Fleet,
        gateway: Gateway,
        scaler: Scaler,
        quota: AppQuota,
        logs: LogHub,
        wake: Callable[[], None],
        app_ws: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.calls = calls
        self.fleet = fleet
        self.gateway = gateway
        self.scaler = scaler
        self.quota = quota
        self.logs = logs
        self._wake = wake
        self.app_ws = app_ws if app_ws is not None else {}  # app id -> its workspace
        self.heartbeats: dict[str, float] = {}  # ephemeral app -> when its client last said so
        # features that complete or check a function's spec when an app is created (secrets:
        # names to ids), and are told of apps created and stopped (schedules); each one's
        # routes module adds its own. A hook that raises refuses the app: nothing is made.
        self.spec_hooks: list[Callable[[m.FunctionSpec, bool], m.FunctionSpec]] = []
        self.on_created: list[Callable[[m.AppInfo, list[m.FunctionSpec]], None]] = []
        self.on_stopped: list[Callable[[str], None]] = []

    def recover(self) -> None:
        """After a restart: each ephemeral app's client gets time to come back."""
        now = time.monotonic()
        for app in self.store.apps():
            if app["state"] == AppState.EPHEMERAL:
                self.heartbeats[app["app_id"]] = now

    def stop_silent(self, now: float, timeout_s: float) -> None:
        """Stop the ephemeral apps whose client has been silent for ``timeout_s``."""
        for app_id, seen in list(self.heartbeats.items()):
            if now - seen > timeout_s:
                log.info(
                    "stopping app %s: its client has been silent for %.0fs", app_id, now - seen
                )
                self.stop(app_id)

    def create(self, req: m.CreateApp, workspace: str = DEFAULT_WORKSPACE) -> m.AppInfo:
        mount = None
        if req.mount is not None:
            validate_manifest(req.mount)
            missing = [
                f.sha256 for root in req.mount.roots for f in root if not self.blobs.has(f.sha256)
            ]
            if missing:
                raise InvalidError(
                    f"the app's source files are not all uploaded ({len(missing)} "
                    "missing); upload them to /blobs first"
                )
            mount = (mount_id(req.mount), encode_manifest(req.mount))
        names = [f.name for f in req.functions]
        if len(set(names)) != len(names):
            raise InvalidError("two functions of the app share one name")
        for spec in req.functions:
            check_spec(spec)
            self.quota.check_spec(spec)
        # web endpoints: one label each, URLs unique across apps
        web = web_name(workspace, req.name)
        self.gateway.check_app(req.functions, web, req.deployed)
        if req.deployed and not req.name:
            raise InvalidError("a deployed app needs a name: strato.App('my-app')")
        for hook in self.spec_hooks:  # secrets, schedules: checked before anything is made
            req.functions = [hook(spec, req.deployed) for spec in req.functions]
        app_id = "ap-" + secrets.token_hex(8)
        fns = []
        for spec in req.functions:
            if mount is not None:
                spec = msgspec.structs.replace(spec, mount_id=mount[0])
            fns.append(("fu-" + secrets.token_hex(8), spec.name, msgspec.msgpack.encode(spec)))
        state = AppState.DEPLOYED if req.deployed else AppState.EPHEMERAL
        replaced = self.store.create_app(
            app_id,
            req.name,
            state.value,
            fns,
            mount,
            replace_deployed=req.deployed,
            workspace=workspace,
        )
        self.app_ws[app_id] = workspace
        self.gateway.app_created(app_id, web, req.deployed)  # before the old stop
        for old in replaced:
            self._stop_in_memory(old)
        if not req.deployed and not req.detached:
            self.heartbeats[app_id] = time.monotonic()
        warm = [
            fid
            for fid, _, raw in fns
            if msgspec.msgpack.decode(raw, type=m.FunctionSpec).scaling.min_containers
        ]
        for fid in warm:  # a warm pool starts at deploy, not at the first call
            self.calls.function(fid)
        if warm:
            self._wake()
        specs = {s.name: s for s in req.functions}
        refs = [
            m.FunctionRef(
                fid, name, self.gateway.web_url(app_id, web, req.deployed, specs.get(name))
            )
            for fid, name, _ in fns
        ]
        info = m.AppInfo(app_id, req.name, state.value, time.time(), refs)
        for created in self.on_created:
            created(info, req.functions)
        return info

    def info(self, row: dict) -> m.AppInfo:
        fns = self.store.functions_of(row["app_id"])
        n = len(self.fleet.registry.of_app(row["app_id"]))
        refs = []
        for f in fns:
            spec = msgspec.msgpack.decode(f["spec"], type=m.FunctionSpec) if f["spec"] else None
            url = self.gateway.web_url(
                row["app_id"],
                web_name(row["workspace"], row["name"]),
                row["state"] == AppState.DEPLOYED,
                spec,
            )
            refs.append(m.FunctionRef(f["function_id"], f["name"], url))
        return m.AppInfo(row["app_id"], row["name"], row["state"], row["created_at"], refs, n)

    async def find(self, ref: str, workspace: str = DEFAULT_WORKSPACE) -> dict:
        """The app of that id, else the deployed app of that name, else the newest running
        one, in ``workspace`` (reads on the store's thread): another workspace's answers
        as a missing one."""
        store = self.store
        rows = await store.aread(store.apps, [ref]) if ref.startswith("ap-") else []
        rows = [r for r in rows if r["workspace"] == workspace]
        row = rows[0] if rows else await store.aread(store.find_app, ref, workspace)
        if row is None:
            raise NotFoundError(
                f"no running or deployed app named {ref!r}; deploy it with `strato deploy FILE`"
            )
        return row

    def stop(self, app_id: str) -> None:
        self.store.set_app_state(app_id, AppState.STOPPED.value)
        self._stop_in_memory(app_id)

    def _stop_in_memory(self, app_id: str) -> None:
        self.heartbeats.pop(app_id, None)
        self.calls.stop_app(app_id)
        # web containers of an app that a newer one replaces drain instead
        draining = self.gateway.retire_app(app_id)
        self.fleet.stop_app(app_id, keep=draining)
        for stopped in self.on_stopped:
            stopped(app_id)
        self.logs.system(app_id, "app stopped")

    def heartbeat(self, app_id: str) -> None:
        if app_id in self.heartbeats:
            self.heartbeats[app_id] = time.monotonic()

    def bind_function(self, function_id: str, req: m.BindFunction) -> m.FunctionRef:
        """The function of one parameter set / options variant of a class (or function),
        created on first use: each is its own pool of containers."""
        parent = self.calls.function(function_id)
        key = hashlib.sha256((req.params or b"") + b"\0" + (req.overrides or b"")).hexdigest()
        name = f"{parent.name}[{key[:12]}]"
        for f in self.store.functions_of(parent.app_id):
            if f["name"] == name:
                return m.FunctionRef(f["function_id"], name)
        changes: dict[str, Any] = {"name": name, "params": req.params}
        if req.overrides:
            types = {f.name: f.type for f in msgspec.structs.fields(m.FunctionSpec)}
            try:
                raw = msgspec.msgpack.decode(req.overrides)
            except msgspec.DecodeError as e:
                raise InvalidError(f"option overrides are not msgpack: {e}") from None
            if not isinstance(raw, dict) or not all(
                isinstance(k, str) and k in BINDABLE for k in raw
            ):
                raise InvalidError(
                    "bad option overrides for the function variant: a map of some of "
                    + ", ".join(sorted(BINDABLE))
                )
            try:
                changes.update({k: msgspec.convert(v, types[k]) for k, v in raw.items()})
            except msgspec.ValidationError as e:
                raise InvalidError(f"bad option overrides: {e}") from None
        spec = check_spec(msgspec.structs.replace(parent.spec, **changes))
        self.quota.check_spec(spec)
        fid = "fu-" + secrets.token_hex(8)
        self.store.add_function(parent.app_id, fid, name, msgspec.msgpack.encode(spec))
        return m.FunctionRef(fid, name)

    def update_autoscaler(self, function_id: str, req: m.UpdateAutoscaler) -> None:
        fn = self.calls.function(function_id)
        sc = fn.spec.scaling
        changes = {k: v for k, v in msgspec.structs.asdict(req).items() if v is not None}
        scaling = msgspec.structs.replace(sc, **changes)
        spec = check_spec(msgspec.structs.replace(fn.spec, scaling=scaling))
        self.quota.check_spec(spec)
        self.scaler.spec_changed(function_id)
        self.store.update_function_spec(function_id, msgspec.msgpack.encode(spec))
        self.calls.replace_spec(function_id, spec)
        self._wake()
