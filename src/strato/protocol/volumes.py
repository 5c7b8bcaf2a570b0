"""Volume names and paths, checked alike by the SDK, the control plane and the worker."""

from __future__ import annotations

import re

from strato.exceptions import InvalidError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_PATH = 4096
MAX_SEGMENT = 255


def check_name(name: object) -> str:
    """A volume's name: 1-64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter
    or digit (Modal's rule)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidError(
            f"volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    return name


def norm_path(path: object, *, root_ok: bool = False) -> str:
    """A path inside a volume as stored: relative, ``/``-separated, no ``.``/``..`` or empty
    segments. A leading ``/`` is the volume's root. ``root_ok``: the root itself (``""``)
    is allowed (listing, recursive removal)."""
    if not isinstance(path, str):
        raise InvalidError(f"volume path {path!r}: use a str")
    if "\x00" in path or len(path) > MAX_PATH:
        raise InvalidError(f"volume path {path[:80]!r}: no NUL bytes, at most {MAX_PATH} chars")
    parts = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            raise InvalidError(f"volume path {path!r}: '..' would leave the volume; refused")
        if len(seg.encode()) > MAX_SEGMENT:
            raise InvalidError(f"volume path {path!r}: a name over {MAX_SEGMENT} bytes")
        parts.append(seg)
    out = "/".join(parts)
    if not out and not root_ok:
        raise InvalidError(f"volume path {path!r} names the volume's root, not a file")
    return out


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or inside it (``prefix`` normalised; ``""``: root)."""
    return not prefix or path == prefix or path.startswith(prefix + "/")
