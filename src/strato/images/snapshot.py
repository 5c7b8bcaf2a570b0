"""A container's writable layer as an image layer (``sb.snapshot_filesystem()``).

``pack_layer`` writes an overlayfs upper directory as a tar: files, folders, links, and
overlayfs' own marks, so that the layer stacks over the image as the container saw it: a
deleted file is a whiteout (a character device 0:0, kept as one) and a folder made anew
over one of the image's is *opaque* (its ``trusted.overlay.opaque`` xattr, kept as the
PAX header ``STRATO.opaque``). ``unpack_layer`` makes such a tar a layer directory again.
The tar's bytes are the layer's identity: their sha256 names the blob, which names the
layer (:class:`strato.protocol.images.SnapshotLayer`). Unpacking trusts nothing in the tar
(it may have been uploaded by anyone who can upload a blob): ``tarfile``'s ``tar`` filter
refuses names and links that leave the layer (and clears setuid bits), and the only
device it may make is a whiteout.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

from strato.images.errors import ImageBuildError

OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_PAX = "STRATO.opaque"


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def pack_layer(upper: Path, scratch: Path) -> tuple[Path, str, int]:
    """Tar ``upper`` into a new file under ``scratch``: (its path, sha256, size)."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="snapshot-", suffix=".tar", dir=scratch)
    os.close(fd)
    out = Path(name)
    try:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(upper):
                dirnames.sort()
                for entry in (*sorted(dirnames), *sorted(filenames)):
                    full = os.path.join(dirpath, entry)
                    info = tar.gettarinfo(full, os.path.relpath(full, upper))
                    if info.isdir() and _is_opaque(full):
                        info.pax_headers = {OPAQUE_PAX: "y"}
                    if info.isreg():
                        with open(full, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
        h = hashlib.sha256()
        with open(out, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return out, h.hexdigest(), out.stat().st_size
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _layer_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    if (member.ischr() or member.isblk() or member.isfifo()) and not (
        member.ischr() and member.devmajor == 0 and member.devminor == 0
    ):
        raise ImageBuildError(f"snapshot layer: {member.name} is a device, not a whiteout")
    return tarfile.tar_filter(member, dest)


def unpack_layer(tar_path: Path, dest: Path) -> None:
    """Unpack a tar made by :func:`pack_layer` into ``dest`` (as root: owners kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            opaque = []
            for member in tar:
                tar.extract(member, dest, filter=_layer_filter, numeric_owner=True)
                if member.isdir() and member.pax_headers.get(OPAQUE_PAX) == "y":
                    opaque.append(dest / member.name)
            for d in opaque:
                os.setxattr(d, OPAQUE_XATTR, b"y", follow_symlinks=False)
    except (tarfile.TarError, OSError) as e:
        raise ImageBuildError(f"snapshot layer: cannot unpack it: {e}") from None
