"""The hidden top layer: strato's runtime dependencies for the image's Python.

``msgspec`` and ``cloudpickle``, at the host's versions, are pip-installed with
``--target`` into :data:`DEPS_DIR`, which containers put on ``PYTHONPATH``. The serving
stack of web endpoints (uvicorn with httptools, websockets and uvloop; strato's WSGI
adapter is part of strato's own package) goes into :data:`SERVING_DIR`, which a web
endpoint's container appends to ``sys.path`` *after* the image's site-packages: a user's
image needs only what the user's code imports, and a version the user installed on
purpose wins over strato's. The layer holds nothing else, so it only depends on the base
(Debian release and Python) and is shared by every image on that base.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import shlex
from pathlib import Path

from strato.images.cache import remove_tree

DEPS_DIR = "/opt/strato/deps"
DEPS = ("msgspec", "cloudpickle")
# strato.container.web appends this directory to sys.path (it keeps its own copy of the
# path: the container's start path does not import strato.images)
SERVING_DIR = "/opt/strato/serving"
SERVING = ("uvicorn", "h11", "click", "httptools", "websockets", "uvloop")
_DEPS_KEY_VERSION = "strato-deps-v2"


def _versions(names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((name, importlib.metadata.version(name)) for name in names)


@functools.cache
def host_versions() -> tuple[tuple[str, str], ...]:
    """``((name, version), ...)`` of :data:`DEPS` and :data:`SERVING` as installed here."""
    return _versions(DEPS) + _versions(SERVING)


def deps_key(base_key: str) -> str:
    """The deps layer's key: the base layer's key and the host's versions."""
    text = "\n".join([_DEPS_KEY_VERSION, base_key, *(f"{n}=={v}" for n, v in host_versions())])
    return hashlib.sha256(text.encode()).hexdigest()


def deps_commands() -> list[tuple[str, str]]:
    """Install the host's versions of each set into its directory; if the index lacks
    one of a set, take the newest of that set instead."""
    return [_install(DEPS_DIR, DEPS), _install(SERVING_DIR, SERVING)]


def _install(target: str, names: tuple[str, ...]) -> tuple[str, str]:
    pinned = [f"{n}=={v}" for n, v in _versions(names)]
    pip = ["python3", "-m", "pip", "install", "--no-deps", "--target", target]
    exact = shlex.join([*pip, *pinned])
    newest = shlex.join([*pip, "--upgrade", *names])
    script = f"{exact} || {{ echo 'strato: falling back to the newest versions'; {newest}; }}"
    return shlex.join(["pip", "install", "--target", target, *pinned]), script


def keep_only_deps(upper: Path) -> None:
    """Drop from the built layer anything outside ``/opt/strato`` (pip's by-products)."""
    keep = Path(DEPS_DIR.strip("/")).parts[:2]  # ("opt", "strato")
    for entry in upper.iterdir():
        if entry.name != keep[0]:
            remove_tree(entry)
    opt = upper / keep[0]
    for entry in opt.iterdir() if opt.is_dir() else []:
        if entry.name != keep[1]:
            remove_tree(entry)
