"""``App``: groups functions; ``app.run()`` for an ephemeral run, ``app.deploy()`` to keep it."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable

import msgspec

from strato import exceptions as exc
from strato.client import session
from strato.client.mounts import collect_local_mount
from strato.protocol import messages as m

from . import options
from .function import Function

_MISSING = object()


class App:
    """A group of functions that run and deploy together (Modal's ``modal.App``)."""

    def __init__(
        self,
        name: str | None = None,
        *,
        image=None,
        secrets=None,
        volumes=None,
        include_source: bool = True,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name or len(name) > 64):
            raise exc.InvalidError(f"App name {name!r}: use a non-empty str of at most 64 chars")
        self.name = name
        self.image = image
        self.secrets = list(secrets or [])
        self.volumes = dict(volumes or {})
        self._functions: dict[str, Function] = {}
        self._entrypoints: dict[str, Callable] = {}
        self._app_id: str | None = None
        self._running = False

    def __repr__(self) -> str:
        return f"<strato.App {self.name or '(unnamed)'}>"

    @property
    def app_id(self) -> str | None:
        return self._app_id

    @property
    def registered_functions(self) -> dict[str, Function]:
        return dict(self._functions)

    @property
    def registered_entrypoints(self) -> dict[str, Callable]:
        return dict(self._entrypoints)

    # ------------------------------------------------------------------ decorators

    def function(
        self,
        _warn_parentheses_missing=None,
        *,
        image=None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | tuple[int, int] | None = None,
        gpu: str | list[str] | None = None,
        timeout: float = 300,
        retries: int | options.Retries | None = None,
        env: dict[str, str] | None = None,
        serialized: bool = False,
        min_containers: int = 0,
        max_containers: int | None = None,
        buffer_containers: int = 0,
        scaledown_window: float | None = None,
        name: str | None = None,
    ) -> Callable[[Callable], Function]:
        if _warn_parentheses_missing is not None:
            raise exc.InvalidError("Did you forget parentheses? Use `@app.function()`.")
        resources = options.resources(cpu, memory, gpu)
        spec_base = dict(
            resources=resources,
            scaling=options.scaling(
                min_containers, max_containers, buffer_containers, scaledown_window
            ),
            timeout=options.timeout(timeout),
            retries=options.retry_policy(retries),
            env=options.env(env),
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        )
        if not isinstance(serialized, bool):
            raise exc.InvalidError("serialized= must be True or False")

        def wrap(f: Callable) -> Function:
            if isinstance(f, Function):
                raise exc.InvalidError(f"{f.tag} is decorated twice with @app.function()")
            if not callable(f):
                raise exc.InvalidError(f"@app.function() decorates functions, not {f!r}")
            tag = name or f.__qualname__
            if "<locals>" in f.__qualname__ and not serialized:
                raise exc.InvalidError(
                    f"{f.__qualname__} is defined inside another function, so a container "
                    "cannot import it: move it to module level or pass serialized=True"
                )
            if tag in self._functions:
                raise exc.InvalidError(f"app {self.name!r} has two functions named {tag!r}")
            data = None
            if serialized:
                import cloudpickle

                try:
                    data = cloudpickle.dumps(f)
                except Exception as e:
                    raise exc.SerializationError(
                        f"cannot pickle {tag} for serialized=True: {e}"
                    ) from None
            spec = m.FunctionSpec(
                name=tag,
                module=f.__module__,
                qualname=f.__qualname__,
                serialized=data,
                is_generator=inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f),
                is_async=inspect.iscoroutinefunction(f),
                **spec_base,
            )
            fn = Function(f, spec, self)
            self._functions[tag] = fn
            return fn

        return wrap

    def local_entrypoint(self, _warn_parentheses_missing=None, *, name: str | None = None):
        if _warn_parentheses_missing is not None:
            raise exc.InvalidError("Did you forget parentheses? Use `@app.local_entrypoint()`.")

        def wrap(f: Callable) -> Callable:
            self._entrypoints[name or f.__name__] = f
            return f

        return wrap

    # ------------------------------------------------------------------ running

    def _specs(self) -> tuple[list[m.FunctionSpec], m.CreateApp]:
        in_container = os.environ.get("STRATO_IN_CONTAINER") == "1"
        if in_container:
            raise exc.InvalidError("an app cannot be run from inside one of its containers")
        mount = collect_local_mount()
        specs = []
        for fn in self._functions.values():
            spec = fn._spec
            if spec.module == "__main__" and spec.serialized is None:
                if mount.main_module_name is None:
                    raise exc.InvalidError(
                        f"{fn.tag} is defined in an interactive session: pass serialized=True"
                    )
                spec = msgspec.structs.replace(spec, module=mount.main_module_name)
            specs.append(spec)
        return specs, mount

    def _create(self, *, deployed: bool, detached: bool = False, name: str | None = None):
        client = session.api()
        specs, mount = self._specs()
        session.upload_mount(client, mount)
        info = client.call(
            "POST",
            "/apps",
            m.CreateApp(
                name or self.name, specs, deployed=deployed, mount=mount.manifest, detached=detached
            ),
            m.AppInfo,
        )
        ids = {f.name: f.function_id for f in info.functions}
        for tag, fn in self._functions.items():
            fn._hydrate(ids[tag], info.app_id)
        self._app_id = info.app_id
        return client, info

    @contextlib.contextmanager
    def run(self, *, detach: bool = False, quiet: bool = False):
        """Run the app for the duration of the ``with`` block (an ephemeral app)."""
        if self._running:
            raise exc.InvalidError(f"{self!r} is already running")
        client, info = self._create(deployed=False, detached=detach)
        if not quiet:
            session.progress(f"app {info.app_id} running ({len(info.functions)} functions)")
        follower = session.LogFollower(
            client, info.app_id, quiet=quiet, heartbeat=not detach
        ).start()
        self._running = True
        try:
            yield self
        finally:
            self._running = False
            follower.stop()
            if not detach:
                try:
                    client.call("POST", f"/apps/{info.app_id}/stop")
                except exc.Error as e:
                    session.progress(f"could not stop app {info.app_id}: {e}")
            elif not quiet:
                session.progress(
                    f"app {info.app_id} keeps running (detached); stop it with "
                    f"`strato app stop {info.app_id}`"
                )

    def deploy(self, name: str | None = None) -> App:
        """Deploy the app: it stays until stopped or redeployed; call its functions by name."""
        name = name or self.name
        if not name:
            raise exc.InvalidError("a deployed app needs a name: strato.App('my-app')")
        _, info = self._create(deployed=True, name=name)
        session.progress(
            f"deployed app {name!r} ({info.app_id}) with functions: "
            + ", ".join(f.name for f in info.functions)
        )
        return self

    def stop(self) -> None:
        if self._app_id is not None:
            session.api().call("POST", f"/apps/{self._app_id}/stop")
