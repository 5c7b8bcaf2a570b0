"""The manifest of the user's local source files shipped to the container ("automount").

A manifest lists, per root, the files by relative path and content hash. Each root becomes
one ``sys.path`` entry in the container, in manifest order. The blobs themselves travel
separately, content-addressed by their sha256, so an unchanged file is never sent twice.
"""

from __future__ import annotations

import re

import msgspec

from strato.exceptions import InvalidError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MOUNT_ID_VERSION = "strato-mount-v1"


class MountFile(msgspec.Struct, frozen=True):
    """One file of a root: where it goes, what it holds, and its permission bits."""

    path: str  # posix path relative to its root, e.g. "pkg/util.py"
    sha256: str
    size: int
    mode: int  # permission bits, e.g. 0o644


class MountManifest(msgspec.Struct, frozen=True):
    """The files to materialise; each root becomes one ``sys.path`` entry, in this order."""

    roots: list[list[MountFile]]


def mount_id(manifest: MountManifest) -> str:
    """A stable id of the manifest's content: ``"mnt-"`` + sha256 of a canonical encoding.

    Files are sorted by path within each root (their listed order does not matter); the
    order of the roots does, as it is the ``sys.path`` order.
    """
    canonical = [
        [[f.path, f.sha256, f.size, f.mode] for f in sorted(root, key=lambda f: f.path)]
        for root in manifest.roots
    ]
    import hashlib  # (here: a sandbox agent imports this module, and never needs it)

    data = msgspec.msgpack.encode([_MOUNT_ID_VERSION, canonical])
    return "mnt-" + hashlib.sha256(data).hexdigest()


def validate_path(path: str) -> None:
    """Refuse a path that is not a plain relative posix path (absolute, ``..``, empty parts)."""
    if not path:
        raise InvalidError("a mount file path is empty")
    if "\\" in path or "\x00" in path:
        raise InvalidError(f"mount file path {path!r} contains a backslash or NUL byte")
    if path.startswith("/"):
        raise InvalidError(f"mount file path {path!r} is absolute; it must be relative")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidError(
                f"mount file path {path!r} has an empty, '.' or '..' component; "
                "paths must stay inside their root"
            )


def validate_manifest(manifest: MountManifest) -> None:
    """Check every entry of an untrusted manifest; raise InvalidError on the first bad one."""
    for i, root in enumerate(manifest.roots):
        files: set[str] = set()
        dirs: set[str] = set()
        for f in root:
            validate_path(f.path)
            if not _SHA256_RE.fullmatch(f.sha256):
                raise InvalidError(
                    f"mount file {f.path!r}: sha256 {f.sha256!r} is not 64 lowercase hex digits"
                )
            if f.size < 0:
                raise InvalidError(f"mount file {f.path!r}: negative size {f.size}")
            if not 0 <= f.mode <= 0o7777:
                raise InvalidError(
                    f"mount file {f.path!r}: mode {f.mode:#o} is not permission bits"
                )
            if f.path in files:
                raise InvalidError(f"mount root {i}: path {f.path!r} is listed twice")
            if f.path in dirs:
                raise InvalidError(f"mount root {i}: {f.path!r} is both a file and a directory")
            files.add(f.path)
            parts = f.path.split("/")
            for n in range(1, len(parts)):
                parent = "/".join(parts[:n])
                if parent in files:
                    raise InvalidError(f"mount root {i}: {parent!r} is both a file and a directory")
                dirs.add(parent)


def encode_manifest(manifest: MountManifest) -> bytes:
    """The manifest as msgpack, for the wire."""
    return msgspec.msgpack.encode(manifest)


def decode_manifest(data: bytes) -> MountManifest:
    """Decode and validate a manifest received from the other side."""
    try:
        manifest = msgspec.msgpack.decode(data, type=MountManifest)
    except msgspec.DecodeError as exc:
        raise InvalidError(f"the mount manifest cannot be decoded: {exc}") from exc
    validate_manifest(manifest)
    return manifest
