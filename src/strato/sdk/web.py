"""Web endpoint decorators: ``@fastapi_endpoint``, ``@asgi_app``, ``@wsgi_app``,
``@web_server`` (Modal's names and arguments).

They only annotate the function (``__strato_web__``, a ``WebConfig`` whose label may still
be empty); ``App.function`` / ``App.cls`` read the annotation with ``web_spec()`` and put it
in the ``FunctionSpec``. Stack them under the app decorator, as in Modal::

    @app.function()
    @strato.fastapi_endpoint(method="POST")
    def predict(item: dict) -> dict: ...

Nothing here imports FastAPI: the container does, when it serves the endpoint. The
gateway (``strato.server.gateway``) routes ``/<app>/<label>/...`` and
``<app>-<label>.localhost`` to the endpoint's containers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from strato.exceptions import InvalidError
from strato.protocol.messages import WebConfig

WEB_ATTR = "__strato_web__"  # the mark a web decorator leaves on the function

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _no_parens(name: str, arg) -> None:
    if arg is not None:
        raise InvalidError(f"Did you forget parentheses? Use `@strato.{name}()`.")


def _check_label(label: str | None) -> None:
    if label is not None and (not isinstance(label, str) or not LABEL_RE.match(label)):
        raise InvalidError(
            f"label={label!r}: use 1 to 63 lowercase letters, digits and hyphens "
            "(not starting or ending with a hyphen)"
        )


def _auth(requires_proxy_auth: bool, requires_auth: bool) -> bool:
    for name, v in (("requires_proxy_auth", requires_proxy_auth), ("requires_auth", requires_auth)):
        if not isinstance(v, bool):
            raise InvalidError(f"{name}= must be True or False")
    return requires_proxy_auth or requires_auth


def _mark(config: WebConfig) -> Callable:
    def mark(f: Callable) -> Callable:
        if getattr(f, WEB_ATTR, None) is not None:
            raise InvalidError(f"{getattr(f, '__qualname__', f)} has two web decorators")
        if hasattr(f, "_spec") and hasattr(f, "remote"):
            raise InvalidError(
                "put the web decorator under @app.function() (it must decorate the function "
                "first): @app.function() then @strato.fastapi_endpoint() on the next line"
            )
        if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
            raise InvalidError(f"{f.__qualname__}: a web endpoint cannot be a generator")
        setattr(f, WEB_ATTR, config)
        return f

    return mark


def fastapi_endpoint(
    _warn_parentheses_missing=None,
    *,
    method: str = "GET",
    label: str | None = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
    requires_auth: bool = False,
) -> Callable:
    """Serve the function as one FastAPI route (``method`` at ``/``); its parameters are
    query parameters or the JSON body, as FastAPI reads them. ``docs=True`` adds ``/docs``.
    ``requires_auth`` (Modal: ``requires_proxy_auth``) makes the gateway ask for the web
    token in a ``Strato-Token`` header."""
    _no_parens("fastapi_endpoint", _warn_parentheses_missing)
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise InvalidError(f"method={method!r}: use one of {', '.join(HTTP_METHODS)}")
    if not isinstance(docs, bool):
        raise InvalidError("docs= must be True or False")
    _check_label(label)
    return _mark(
        WebConfig(
            "fastapi",
            label or "",
            method=method.upper(),
            docs=docs,
            requires_auth=_auth(requires_proxy_auth, requires_auth),
        )
    )


def web_endpoint(*args, **kwargs) -> Callable:
    """Modal's older name of ``fastapi_endpoint``."""
    return fastapi_endpoint(*args, **kwargs)


def asgi_app(
    _warn_parentheses_missing=None,
    *,
    label: str | None = None,
    requires_proxy_auth: bool = False,
    requires_auth: bool = False,
) -> Callable:
    """The function returns an ASGI app (FastAPI, Starlette, a raw ASGI callable), built
    once per container; every request goes to it."""
    _no_parens("asgi_app", _warn_parentheses_missing)
    _check_label(label)
    return _mark(
        WebConfig("asgi", label or "", requires_auth=_auth(requires_proxy_auth, requires_auth))
    )


def wsgi_app(
    _warn_parentheses_missing=None,
    *,
    label: str | None = None,
    requires_proxy_auth: bool = False,
    requires_auth: bool = False,
) -> Callable:
    """The function returns a WSGI app (Flask, Django, ...), built once per container."""
    _no_parens("wsgi_app", _warn_parentheses_missing)
    _check_label(label)
    return _mark(
        WebConfig("wsgi", label or "", requires_auth=_auth(requires_proxy_auth, requires_auth))
    )


def web_server(
    port: int,
    *,
    startup_timeout: float = 5.0,
    label: str | None = None,
    requires_proxy_auth: bool = False,
    requires_auth: bool = False,
) -> Callable:
    """The function starts a server (any process) listening on ``port`` inside the
    container and returns; requests are proxied to it once the port accepts connections
    (within ``startup_timeout`` seconds)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidError(f"web_server(port={port!r}): use a port number from 1 to 65535")
    if isinstance(startup_timeout, bool) or not isinstance(startup_timeout, int | float):
        raise InvalidError("startup_timeout= must be a number of seconds")
    if not 0 < startup_timeout <= 3600:
        raise InvalidError(f"startup_timeout={startup_timeout!r}: use 0 < seconds <= 3600")
    _check_label(label)
    return _mark(
        WebConfig(
            "server",
            label or "",
            requires_auth=_auth(requires_proxy_auth, requires_auth),
            port=port,
            startup_timeout=float(startup_timeout),
        )
    )


def default_label(name: str) -> str:
    """Modal's default label: the function's (or ``Class-method``'s) name, lowercased,
    with underscores and dots as hyphens."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "endpoint"


def web_spec(f: Callable, name: str, attr: str | None = None) -> WebConfig | None:
    """The ``WebConfig`` of a decorated function (or class method ``attr``), with its label
    filled in; None for a plain function."""
    config = getattr(f, WEB_ATTR, None)
    if config is None:
        return None
    import msgspec

    return msgspec.structs.replace(config, label=config.label or default_label(name), attr=attr)


def web_methods(user_cls: type) -> dict[str, Callable]:
    """The methods of a class decorated with a web decorator."""
    return {
        k: v
        for k, v in vars(user_cls).items()
        if callable(v) and getattr(v, WEB_ATTR, None) is not None
    }


def function_web_spec(f: Callable, name: str, handling: dict) -> WebConfig | None:
    """``web_spec`` for ``@app.function``, refusing what a web endpoint cannot be."""
    config = web_spec(f, name)
    if config is not None and handling.get("batch_max_size"):
        raise InvalidError(f"{name} is a web endpoint: it cannot be @batched")
    return config


def class_web_specs(user_cls: type, spec):
    """One ``FunctionSpec`` per web method of an ``@app.cls`` class (each its own pool of
    containers, as in Modal): (tag, raw method, spec)."""
    import msgspec

    out = []
    for attr, f in web_methods(user_cls).items():
        name = f"{user_cls.__qualname__}.{attr}"
        if hasattr(f, "__strato_batch__"):
            raise InvalidError(f"{name} is a web endpoint: it cannot be @batched")
        changes: dict = {
            "name": name,
            "web": web_spec(f, f"{user_cls.__name__}-{attr}", attr=attr),
            "generator_methods": [],
            "async_methods": [],
            "batch_max_size": 0,
            "batch_wait_ms": 0,
        }
        concurrency = getattr(f, "__strato_concurrency__", None)
        if concurrency is not None:
            changes["max_inputs"] = concurrency.max_inputs
            changes["target_inputs"] = concurrency.target_inputs
        out.append((name, f, msgspec.structs.replace(spec, **changes)))
    return out
