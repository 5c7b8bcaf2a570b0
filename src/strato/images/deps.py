"""The hidden top layer: strato's runtime dependencies for the image's Python.

``msgspec`` and ``cloudpickle``, at the host's versions, are pip-installed with
``--target`` into :data:`DEPS_DIR`. The layer holds nothing else, so it only depends on
the base (Debian release and Python) and is shared by every image on that base.
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
_DEPS_KEY_VERSION = "strato-deps-v1"


@functools.cache
def host_versions() -> tuple[tuple[str, str], ...]:
    """``((name, version), ...)`` of :data:`DEPS` as installed here."""
    return tuple((name, importlib.metadata.version(name)) for name in DEPS)


def deps_key(base_key: str) -> str:
    """The deps layer's key: the base layer's key and the host's versions."""
    text = "\n".join([_DEPS_KEY_VERSION, base_key, *(f"{n}=={v}" for n, v in host_versions())])
    return hashlib.sha256(text.encode()).hexdigest()


def deps_commands() -> list[tuple[str, str]]:
    """Install the host's versions; if the index lacks one, take the newest instead."""
    pinned = [f"{n}=={v}" for n, v in host_versions()]
    pip = ["python3", "-m", "pip", "install", "--no-deps", "--target", DEPS_DIR]
    exact = shlex.join([*pip, *pinned])
    newest = shlex.join([*pip, "--upgrade", *DEPS])
    script = f"{exact} || {{ echo 'strato: falling back to the newest versions'; {newest}; }}"
    return [(shlex.join(["pip", "install", "--target", DEPS_DIR, *pinned]), script)]


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
