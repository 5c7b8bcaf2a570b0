"""``App``: groups functions; ``app.run()`` for an ephemeral run, ``app.deploy()`` to keep it."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from strato import exceptions as exc
from strato import settings
from strato.client import console, session
from strato.client.mounts import LocalMount, collect_local_mount
from strato.protocol import messages as m

from . import options
from .cls import Cls, class_methods
from .function import Function
from .image import Image, upload_image_files
from .schedule import schedule_spec
from .secret import Secret, check_secrets, secret_refs
from .volume import Volume, hydrate_mounts, volume_mounts
from .web import class_web_specs, function_web_spec, web_methods

RUNTIMES = ("bwrap", "gvisor", "process")


def _input_handling(f: Callable) -> dict:
    """FunctionSpec fields from ``@concurrent`` / ``@batched`` on a function or method."""
    concurrency = getattr(f, "__strato_concurrency__", None)
    batch = getattr(f, "__strato_batch__", None)
    if concurrency is not None and batch is not None:
        raise exc.InvalidError(f"{f.__qualname__} cannot be both @concurrent and @batched")
    if concurrency is not None:
        return {"max_inputs": concurrency.max_inputs, "target_inputs": concurrency.target_inputs}
    if batch is not None:
        return {"batch_max_size": batch.max_batch_size, "batch_wait_ms": batch.wait_ms}
    return {}


_MISSING = object()


SHARED_OPTIONS = (
    "image",
    "cpu",
    "memory",
    "gpu",
    "timeout",
    "retries",
    "env",
    "min_containers",
    "max_containers",
    "buffer_containers",
    "scaledown_window",
    "enable_memory_snapshot",
    "block_network",
    "ephemeral_disk",
    "runtime",
    "volumes",
    "region",  # --- broker: where its nodes may be bought
    "cloud",
    "nonpreemptible",
)
"""The options ``@app.function()`` and ``@app.cls()`` share (``App._spec_base``)."""


def _shared_options(params: dict[str, Any]) -> dict[str, Any]:
    """The shared options among a decorator's parameters (its ``locals()`` on entry)."""
    return {name: params[name] for name in SHARED_OPTIONS}


def _check_schedulable(f: Callable, tag: str) -> None:
    """A scheduled function is called with no arguments."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return
    needed = [
        p.name
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if needed:
        raise exc.InvalidError(
            f"{tag}: a scheduled function is called with no arguments, but it needs {needed}; "
            "give them defaults"
        )


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
        self.secrets = check_secrets(secrets, "App(secrets=...)")
        self._secret_objs: dict[str, list[Secret]] = {}  # function tag -> its secrets
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

    def _spec_base(
        self,
        *,
        image,
        cpu,
        memory,
        gpu,
        timeout,
        retries,
        env,
        min_containers,
        max_containers,
        buffer_containers,
        scaledown_window,
        enable_memory_snapshot,
        block_network,
        runtime,
        volumes,
        ephemeral_disk=None,
        region=None,  # --- broker
        cloud=None,
        nonpreemptible=False,
    ) -> tuple[dict[str, Any], Image | None]:
        """The FunctionSpec fields every function and class shares, validated now, and the
        image they run on."""
        image = image if image is not None else self.image
        if image is not None and not isinstance(image, Image):
            raise exc.InvalidError(f"image={image!r}: use a strato.Image")
        for flag, value in (
            ("enable_memory_snapshot", enable_memory_snapshot),
            ("block_network", block_network),
        ):
            if not isinstance(value, bool):
                raise exc.InvalidError(f"{flag}= must be True or False")
        if runtime is not None and runtime not in RUNTIMES:
            raise exc.InvalidError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)}")
        return dict(
            resources=options.resources(cpu, memory, gpu),
            scaling=options.scaling(
                min_containers, max_containers, buffer_containers, scaledown_window
            ),
            timeout=options.timeout(timeout),
            retries=options.retry_policy(retries),
            env=options.env(env),
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            enable_memory_snapshot=enable_memory_snapshot,
            image=image.spec if image is not None else None,
            block_network=block_network,
            ephemeral_disk_mb=options.ephemeral_disk(ephemeral_disk),
            runtime=runtime,
            volumes=volume_mounts({**self.volumes, **(volumes or {})}),
            **options.placement(region, cloud, nonpreemptible),  # --- broker
        ), image

    def _register(self, tag: str, obj) -> None:
        if tag in self._functions:
            raise exc.InvalidError(f"app {self.name!r} has two functions named {tag!r}")
        self._functions[tag] = obj

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
        enable_memory_snapshot: bool = False,
        block_network: bool = False,
        ephemeral_disk: int | None = None,
        runtime: str | None = None,
        volumes: dict[str, Volume] | None = None,
        secrets: list[Secret] | None = None,
        region: str | list[str] | None = None,  # --- broker
        cloud: str | None = None,
        nonpreemptible: bool = False,
        schedule=None,
        name: str | None = None,
    ) -> Callable[[Callable], Function]:
        if _warn_parentheses_missing is not None:
            raise exc.InvalidError("Did you forget parentheses? Use `@app.function()`.")
        base, image_obj = self._spec_base(**_shared_options(locals()))
        if not isinstance(serialized, bool):
            raise exc.InvalidError("serialized= must be True or False")
        secret_objs = [*self.secrets, *check_secrets(secrets)]  # secrets: sent at app creation
        schedule_ = schedule_spec(schedule)  # schedules: run by the control plane when deployed

        def wrap(f: Callable) -> Function:
            if isinstance(f, Function):
                raise exc.InvalidError(f"{f.tag} is decorated twice with @app.function()")
            if inspect.isclass(f) or not callable(f):
                raise exc.InvalidError(
                    f"@app.function() decorates functions, not {f!r}; use @app.cls() for classes"
                )
            tag = name or f.__qualname__
            if "<locals>" in f.__qualname__ and not serialized:
                raise exc.InvalidError(
                    f"{f.__qualname__} is defined inside another function, so a container "
                    "cannot import it: move it to module level or pass serialized=True"
                )
            data = None
            if (
                serialized
                and image_obj is not None
                and image_obj.python_version
                != (f"{sys.version_info.major}.{sys.version_info.minor}")
            ):
                raise exc.InvalidError(
                    f"{tag}: serialized=True ships the function pickled, which needs the same "
                    f"Python here and in the image ({image_obj.python_version}); use a module-"
                    "level function instead"
                )
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
                **_input_handling(f),
                **base,
            )
            web = function_web_spec(f, tag, _input_handling(f))  # web endpoints
            if web is not None:
                spec = msgspec.structs.replace(spec, web=web)
            if schedule_ is not None:
                _check_schedulable(f, tag)
                spec = msgspec.structs.replace(spec, schedule=schedule_)
            self._secret_objs[tag] = secret_objs
            fn = Function(f, spec, self)
            fn._image = image_obj
            self._register(tag, fn)
            return fn

        return wrap

    def cls(
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
        min_containers: int = 0,
        max_containers: int | None = None,
        buffer_containers: int = 0,
        scaledown_window: float | None = None,
        enable_memory_snapshot: bool = False,
        block_network: bool = False,
        ephemeral_disk: int | None = None,
        runtime: str | None = None,
        volumes: dict[str, Volume] | None = None,
        secrets: list[Secret] | None = None,
        region: str | list[str] | None = None,  # --- broker
        cloud: str | None = None,
        nonpreemptible: bool = False,
    ) -> Callable[[type], Cls]:
        """A class whose containers build one instance, run its ``@enter`` hooks, and serve
        its ``@method()``s."""
        if _warn_parentheses_missing is not None:
            raise exc.InvalidError("Did you forget parentheses? Use `@app.cls()`.")
        base, image_obj = self._spec_base(**_shared_options(locals()))
        secret_objs = [*self.secrets, *check_secrets(secrets)]  # secrets: sent at app creation

        def wrap(user_cls: type) -> Cls:
            if not inspect.isclass(user_cls):
                raise exc.InvalidError(f"@app.cls() decorates classes, not {user_cls!r}")
            if "<locals>" in user_cls.__qualname__:
                raise exc.InvalidError(
                    f"{user_cls.__qualname__} is defined inside a function: move it to module level"
                )
            methods = class_methods(user_cls)
            if not methods and not web_methods(user_cls):  # web methods
                raise exc.InvalidError(f"{user_cls.__name__} has no @strato.method()")
            batched = [n for n, f in methods.items() if hasattr(f, "__strato_batch__")]
            if batched and len(methods) > 1:
                raise exc.InvalidError(
                    f"{user_cls.__name__}.{batched[0]} is @batched: a class "
                    "with a batched method cannot have other methods"
                )
            handling = _input_handling(methods[batched[0]]) if batched else {}
            concurrency = getattr(user_cls, "__strato_concurrency__", None)
            per_method = {
                f.__strato_concurrency__
                for f in methods.values()
                if hasattr(f, "__strato_concurrency__")
            }
            if len(per_method) > 1:
                raise exc.InvalidError(
                    f"{user_cls.__name__}: its methods have different @concurrent settings; "
                    "the class's containers share one: decorate the class instead"
                )
            if concurrency is None and per_method:
                concurrency = per_method.pop()
            if concurrency is not None:
                if batched:
                    raise exc.InvalidError("a class cannot be both @concurrent and @batched")
                handling = {
                    "max_inputs": concurrency.max_inputs,
                    "target_inputs": concurrency.target_inputs,
                }
            spec = m.FunctionSpec(
                name=user_cls.__qualname__,
                module=user_cls.__module__,
                qualname=user_cls.__qualname__,
                is_class=True,
                generator_methods=[
                    n
                    for n, f in methods.items()
                    if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)
                ],
                async_methods=[
                    n
                    for n, f in methods.items()
                    if inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
                ],
                **handling,
                **base,
            )
            service = Function(None, spec, self)
            service._image = image_obj
            handle = Cls(user_cls, spec, self, service)
            self._register(user_cls.__qualname__, service)
            self._secret_objs[user_cls.__qualname__] = secret_objs
            for tag, raw, web_spec_ in class_web_specs(user_cls, spec):
                endpoint = Function(raw, web_spec_, self)
                endpoint._image = image_obj
                self._register(tag, endpoint)
                self._secret_objs[tag] = secret_objs
            return handle

        return wrap

    def local_entrypoint(self, _warn_parentheses_missing=None, *, name: str | None = None):
        if _warn_parentheses_missing is not None:
            raise exc.InvalidError("Did you forget parentheses? Use `@app.local_entrypoint()`.")

        def wrap(f: Callable) -> Callable:
            self._entrypoints[name or f.__name__] = f
            return f

        return wrap

    # ------------------------------------------------------------------ running

    def _specs(self) -> tuple[list[m.FunctionSpec], LocalMount]:
        if settings.IN_CONTAINER.get():
            raise exc.InvalidError("an app cannot be run from inside one of its containers")
        mount = collect_local_mount()
        specs = []
        for fn in self._functions.values():
            spec = fn._spec
            if spec is None:  # handles without a definition (from_name) are never registered
                raise exc.InvalidError(f"{fn.tag} has no definition in this app")
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
        specs = hydrate_mounts(client, specs)  # volumes: their ids (made if asked)
        specs = self._with_secrets(client, specs)  # secrets: names, ids of anonymous ones
        session.upload_mount(client, mount)
        images: dict[int, Image] = {}
        for fn in self._functions.values():
            if fn._image is not None:
                images[id(fn._image)] = fn._image
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        for image in images.values():
            upload_image_files(client, image)
            if image.python_version != here:
                session.progress(
                    f"image {image.object_id} runs Python {image.python_version}, this client "
                    f"{here}: functions are imported by module path; arguments and results "
                    "must unpickle across the two versions"
                )
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

    def _with_secrets(self, client, specs: list[m.FunctionSpec]) -> list[m.FunctionSpec]:
        """Each spec with its secrets' references (anonymous ones created now, once)."""
        out = []
        made: dict[int, m.SecretRef] = {}  # anonymous secrets of this app, each made once
        for spec in specs:
            objs = self._secret_objs.get(spec.name, self.secrets)
            refs = secret_refs(client, objs, made)
            out.append(msgspec.structs.replace(spec, secrets=refs))
        return out

    @contextlib.contextmanager
    def run(self, *, detach: bool = False, quiet: bool = False):
        """Run the app for the duration of the ``with`` block (an ephemeral app)."""
        if self._running:
            raise exc.InvalidError(f"{self!r} is already running")
        from .context import output_enabled

        quiet = quiet and not output_enabled()
        client, info = self._create(deployed=False, detached=detach)
        if not quiet:
            session.progress(f"app {info.app_id} running ({len(info.functions)} functions)")
        lines = contextlib.ExitStack()
        if not quiet:  # container lines and local prints never share a line
            lines.enter_context(console.whole_lines())
        follower = session.LogFollower(
            client, info.app_id, quiet=quiet, heartbeat=not detach
        ).start()
        self._running = True
        try:
            yield self
        finally:
            self._running = False
            if not detach:
                try:
                    client.call("POST", f"/apps/{info.app_id}/stop")
                except exc.Error as e:
                    session.progress(f"could not stop app {info.app_id}: {e}")
                # every line its containers printed, up to their end
                follower.stop(until_gone=not quiet)
            else:
                follower.stop()
            lines.close()
            if detach and not quiet:
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

    @classmethod
    def lookup(
        cls, name: str, *, create_if_missing: bool = False, environment_name: str | None = None
    ) -> App:
        """A handle to the running or deployed app ``name`` (Modal's ``App.lookup``); with
        ``create_if_missing=True``, an empty deployed app of that name is created if none
        runs. Its functions: ``strato.Function.from_name(name, function_name)``.
        (``environment_name``: a control plane is one environment; accepted for ported
        code.)"""
        if not isinstance(name, str) or not name:
            raise exc.InvalidError(f"App.lookup({name!r}): give the app's name")
        client = session.api()
        try:
            info = client.call("GET", f"/apps/{name}", None, m.AppInfo)
            if info.state == "stopped":
                raise exc.NotFoundError(name)
        except exc.NotFoundError:
            if not create_if_missing:
                raise exc.NotFoundError(
                    f"no running or deployed app named {name!r}: deploy it with `strato "
                    "deploy FILE`, or pass create_if_missing=True to create an empty one"
                ) from None
            info = client.call("POST", "/apps", m.CreateApp(name, [], deployed=True), m.AppInfo)
        app = cls(name)
        app._app_id = info.app_id
        return app

    def stop(self) -> None:
        if self._app_id is not None:
            session.api().call("POST", f"/apps/{self._app_id}/stop")
