"""Loading a user's app file for ``strato run`` and ``strato deploy``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from strato import exceptions as exc
from strato.sdk.app import App
from strato.sdk.function import Function


def load_module(path: Path) -> ModuleType:
    """Import FILE as a module named after its stem, with its folder first on sys.path,
    so that the containers import it by the same name."""
    if not path.is_file():
        raise exc.InvalidError(f"no such file: {path}")
    if path.suffix != ".py":
        raise exc.InvalidError(f"{path} is not a Python file")
    name = path.stem
    if not name.isidentifier():
        raise exc.InvalidError(
            f"{path.name} cannot be imported as a module: rename it to a "
            "valid Python identifier (letters, digits, underscores)"
        )
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise exc.InvalidError(f"{path} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_app(target: str) -> tuple[App, ModuleType, str | None]:
    """``FILE[::NAME]`` -> (the file's App, its module, NAME or None)."""
    file, _, name = target.partition("::")
    module = load_module(Path(file))
    apps = {k: v for k, v in vars(module).items() if isinstance(v, App)}
    if not apps:
        raise exc.InvalidError(f"{file} defines no strato.App: add `app = strato.App(...)`")
    if len(apps) > 1:
        if "app" not in apps:
            raise exc.InvalidError(
                f"{file} defines several apps ({', '.join(apps)}); name one `app`"
            )
        return apps["app"], module, name or None
    return next(iter(apps.values())), module, name or None


def pick_target(app: App, name: str | None):
    """("entrypoint", callable) or ("function", Function) for ``strato run``."""
    entrypoints = app.registered_entrypoints
    functions = app.registered_functions
    if name:
        if name in entrypoints:
            return "entrypoint", entrypoints[name]
        if name in functions:
            return "function", functions[name]
        raise exc.InvalidError(
            f"{name!r} is neither a local entrypoint nor a function of the app; choose from: "
            + ", ".join([*entrypoints, *functions])
        )
    if len(entrypoints) == 1:
        return "entrypoint", next(iter(entrypoints.values()))
    if len(entrypoints) > 1:
        raise exc.InvalidError(
            "the app has several local entrypoints; pick one with "
            "FILE::NAME: " + ", ".join(entrypoints)
        )
    if len(functions) == 1:
        fn: Function = next(iter(functions.values()))
        return "function", fn
    raise exc.InvalidError(
        "the app has no @app.local_entrypoint(); pick a function with "
        "FILE::NAME: " + ", ".join(functions)
    )
