"""strato: self-hostable serverless compute for Python, with Modal's API.

``import strato as modal`` ports a Modal app. Names are imported lazily so that a
container's cold start pays only for what it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "App": "strato.sdk.app",
    "Function": "strato.sdk.function",
    "FunctionCall": "strato.sdk.function",
    "Cls": "strato.sdk.cls",
    "Obj": "strato.sdk.cls",
    "Image": "strato.sdk.image",
    "Retries": "strato.sdk.options",
    "Secret": "strato.sdk.secret",
    "Period": "strato.sdk.schedule",
    "Cron": "strato.sdk.schedule",
    "Dict": "strato.sdk.dict",
    "Queue": "strato.sdk.queue",
    "enter": "strato.sdk.partial",
    "exit": "strato.sdk.partial",
    "method": "strato.sdk.partial",
    "parameter": "strato.sdk.partial",
    "concurrent": "strato.sdk.partial",
    "batched": "strato.sdk.partial",
    # web endpoints
    "fastapi_endpoint": "strato.sdk.web",
    "web_endpoint": "strato.sdk.web",
    "asgi_app": "strato.sdk.web",
    "wsgi_app": "strato.sdk.web",
    "web_server": "strato.sdk.web",
    "Volume": "strato.sdk.volume",  # volumes
    "volume": "strato.volume",
    "Sandbox": "strato.sdk.sandbox",  # sandboxes
    "ContainerProcess": "strato.sdk.container_process",
    "sandbox": "strato.sandbox",
    "container_process": "strato.container_process",
    "exceptions": "strato.exceptions",
    # Modal's module paths of ported imports (``modal.exception.NotFoundError``)
    "exception": "strato.exception",
    "functions": "strato.functions",
    "dict": "strato.dict",
    "queue": "strato.queue",
    "call_graph": "strato.call_graph",
    "is_local": "strato.sdk.context",
    "current_input_id": "strato.sdk.context",
    "current_function_call_id": "strato.sdk.context",
    "enable_output": "strato.sdk.context",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'strato' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith(name) else getattr(mod, name)
    globals()[name] = value
    return value
