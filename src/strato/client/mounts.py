"""Find the user's local source files so they reach the container undeclared ("automount").

Every imported module whose file is the user's own (not the standard library, not an
installed distribution, not strato) is shipped: a top-level module as its single file, a
module in a package as its whole top-level package directory. Files are identified by their
sha256, so only the ones the server lacks are uploaded.
"""

from __future__ import annotations

import hashlib
import keyword
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from strato.exceptions import InvalidError
from strato.protocol.mounts import MountFile, MountManifest, mount_id

MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""Largest total size of the local files shipped to the container."""

MAX_DATA_FILE_BYTES = 1024 * 1024
"""Non-Python files in a package directory are shipped only when smaller than this."""

IGNORED_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules"})
IGNORED_SUFFIXES = (".pyc", ".pyo")
SOURCE_SUFFIXES = (".py", ".pyi")

_STRATO_DIR = os.path.realpath(Path(__file__).resolve().parents[1])

_hash_cache: dict[tuple[str, int, int], tuple[str, int]] = {}
"""(sha256, size) of files already hashed, by (real path, size, mtime_ns)."""


@dataclass
class LocalMount:
    """The user's local files: the manifest to send, and where each blob is on this machine."""

    manifest: MountManifest
    files: dict[str, str]  # sha256 -> absolute local path, to upload the missing ones
    main_module_name: str | None  # what the container imports for a script run as __main__

    @property
    def mount_id(self) -> str:
        return mount_id(self.manifest)


def collect_local_mount(
    entry_modules: Iterable[str] = ("__main__",),
    modules: Mapping[str, ModuleType] = sys.modules,
) -> LocalMount:
    """Collect the local source files of ``modules`` (and ``entry_modules``) into a manifest.

    ``entry_modules`` names modules of ``modules`` that are looked at first; names that
    ``modules`` lacks are skipped.
    """
    excluded = _excluded_dirs()
    path_rank = _sys_path_rank()
    roots: dict[str, dict[str, str]] = {}  # root dir -> relative posix path -> real file
    ranks: dict[str, int] = {}
    walked: set[str] = set()
    main_module_name: str | None = None

    names = list(dict.fromkeys([*entry_modules, *list(modules)]))
    for name in names:
        module = modules.get(name)
        if module is None:
            continue
        file = _local_file(module, excluded)
        if file is None:
            continue
        spec = getattr(module, "__spec__", None)
        if name == "__main__" and (spec is None or spec.name == "__main__"):
            main_module_name = _script_module_name(getattr(module, "__file__", file))
            root = os.path.dirname(file)
            roots.setdefault(root, {})[main_module_name + ".py"] = file
            ranks[root] = path_rank.get(root, -1)
            continue
        mod_name = spec.name if name == "__main__" and spec is not None else name
        if _is_strato(mod_name):
            continue
        is_pkg = os.path.basename(file) == "__init__.py"
        root, top = _locate(mod_name, file, is_pkg, path_rank)
        ranks.setdefault(root, path_rank.get(root, len(path_rank)))
        files = roots.setdefault(root, {})
        if top is None:
            files[os.path.basename(file)] = file
        else:
            top_dir = os.path.join(root, top)
            if top_dir not in walked:
                walked.add(top_dir)
                files.update(_walk_package(root, top_dir, excluded))

    _check_total_size(roots)
    ordered = sorted(roots, key=lambda r: (ranks[r], r))
    manifest_roots: list[list[MountFile]] = []
    blobs: dict[str, str] = {}
    for root in ordered:
        entries = []
        for rel, file in sorted(roots[root].items()):
            entry = _mount_file(rel, file)
            blobs.setdefault(entry.sha256, file)
            entries.append(entry)
        manifest_roots.append(entries)
    return LocalMount(MountManifest(manifest_roots), blobs, main_module_name)


def _excluded_dirs() -> tuple[str, ...]:
    """Directories whose modules are never the user's: stdlib, installs, strato itself.

    A virtual environment's prefix is excluded whole. A base interpreter prefix (``/usr``,
    ``/usr/local``) is excluded by its library, script and header subdirectories only,
    so that projects living under it (``/usr/src/app``) still count as local.
    """
    dirs: set[str] = {_STRATO_DIR}
    for key, value in sysconfig.get_paths().items():
        if key != "data" and value:
            dirs.add(value)
    dirs.update(getattr(site, "getsitepackages", list)())
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        dirs.add(user_site)
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
            dirs.add(prefix)
        else:
            dirs.update(
                os.path.join(prefix, sub)
                for sub in ("lib", "lib64", "Lib", "bin", "Scripts", "include", "DLLs")
            )
    return tuple(sorted({os.path.realpath(d) for d in dirs}))


def _is_under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def _is_installed(path: str, excluded: tuple[str, ...]) -> bool:
    parts = Path(path).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return _is_under(path, excluded)


def _is_strato(name: str) -> bool:
    return name == "strato" or name.startswith("strato.")


def _local_file(module: object, excluded: tuple[str, ...]) -> str | None:
    """The module's real source file when it is the user's own, else None."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return None
    real = os.path.realpath(os.path.abspath(file))
    if not os.path.isfile(real) or _is_installed(real, excluded):
        return None
    return real


def _script_module_name(file: str) -> str:
    stem = Path(file).stem
    if not stem.isidentifier() or keyword.iskeyword(stem) or stem == "__main__":
        raise InvalidError(
            f"the script {file!r} cannot be imported in the container as module {stem!r}; "
            "rename the file to a valid Python module name (letters, digits, underscores, "
            "e.g. my_app.py)"
        )
    return stem


def _sys_path_rank() -> dict[str, int]:
    rank: dict[str, int] = {}
    for i, entry in enumerate(sys.path):
        rank.setdefault(os.path.realpath(entry or os.getcwd()), i)
    return rank


def _locate(
    name: str, file: str, is_pkg: bool, path_rank: Mapping[str, int]
) -> tuple[str, str | None]:
    """The (root, top-level package or None) under which ``file`` imports as ``name``.

    Derived from the module name where the file's location matches it (so editable installs
    whose directory is not on ``sys.path`` work too), else from the longest ``sys.path``
    entry that contains the file.
    """
    parts = name.split(".")
    package_dirs = parts if is_pkg else parts[:-1]
    parent = Path(file).parent
    if (is_pkg or Path(file).stem == parts[-1]) and len(package_dirs) < len(parent.parts):
        tail = parent.parts[len(parent.parts) - len(package_dirs) :] if package_dirs else ()
        if list(tail) == package_dirs:
            root = parent.parents[len(package_dirs) - 1] if package_dirs else parent
            return str(root), (package_dirs[0] if package_dirs else None)
    containing = [entry for entry in path_rank if _is_under(file, [entry]) and entry != file]
    if not containing:
        return str(parent), None
    innermost = max(containing, key=len)
    rel = Path(os.path.relpath(file, innermost)).parts
    return innermost, (rel[0] if len(rel) > 1 else None)


def _walk_package(root: str, top_dir: str, excluded: tuple[str, ...]) -> dict[str, str]:
    """The shippable files of a package directory, by posix path relative to ``root``."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and d[0] != ".")
        for filename in filenames:
            if filename.startswith(".") or filename.endswith(IGNORED_SUFFIXES):
                continue
            path = os.path.join(dirpath, filename)
            real = os.path.realpath(path)
            try:
                size = os.stat(real).st_size
            except OSError:
                continue
            if not os.path.isfile(real) or _is_installed(real, excluded):
                continue
            if not filename.endswith(SOURCE_SUFFIXES) and size >= MAX_DATA_FILE_BYTES:
                continue
            found[Path(os.path.relpath(path, root)).as_posix()] = real
    return found


def _check_total_size(roots: Mapping[str, Mapping[str, str]]) -> None:
    sizes = {file: os.stat(file).st_size for files in roots.values() for file in files.values()}
    total = sum(sizes.values())
    if total <= MAX_TOTAL_BYTES:
        return
    biggest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    listing = ", ".join(f"{path} ({size / 2**20:.1f} MiB)" for path, size in biggest)
    raise InvalidError(
        f"the local files to ship to the container total {total / 2**20:.1f} MiB, over the "
        f"{MAX_TOTAL_BYTES // 2**20} MiB limit; the biggest: {listing}. Move large data out "
        "of your package directories (use a Volume) or into a hidden or ignored directory"
    )


def _mount_file(rel: str, file: str) -> MountFile:
    st = os.stat(file)
    key = (file, st.st_size, st.st_mtime_ns)
    cached = _hash_cache.get(key)
    if cached is None:
        cached = _hash_file(file)
        _hash_cache[key] = cached
    digest, size = cached
    return MountFile(path=rel, sha256=digest, size=size, mode=st.st_mode & 0o777)


def _hash_file(path: str) -> tuple[str, int]:
    """The sha256 and size of the bytes read (the size a racing writer left, not the stat)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
