"""Materialise a mount manifest on the node as directories to put on ``sys.path``.

Layout under ``cache_dir``::

    blobs/ab/<sha256>          content-addressed file contents, fetched once per node
    mounts/<mount_id>/<i>/...  one directory per manifest root, built once per mount

A mount is built in a temporary directory next to its final place and renamed into place,
so concurrent builders (threads or processes) both succeed and nobody sees a partial tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable

from strato.protocol.mounts import MountManifest, mount_id, validate_manifest

BLOB_MODE = 0o444


def materialize(
    manifest: MountManifest, cache_dir: str, fetch_blob: Callable[[str], bytes]
) -> list[str]:
    """Build (or find) the mount's trees; return one directory per root, in manifest order.

    ``fetch_blob(sha256)`` is called only for blobs not yet in the node's cache; its bytes are
    checked against the sha256 (ValueError on mismatch). Files are made read-only.
    """
    validate_manifest(manifest)
    cache_dir = os.path.abspath(cache_dir)
    mounts_dir = os.path.join(cache_dir, "mounts")
    final = os.path.join(mounts_dir, mount_id(manifest))
    paths = [os.path.join(final, str(i)) for i in range(len(manifest.roots))]
    if os.path.isdir(final):
        return paths

    os.makedirs(mounts_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=mounts_dir)
    try:
        for i, root in enumerate(manifest.roots):
            root_dir = os.path.join(tmp, str(i))
            os.mkdir(root_dir)
            for f in root:
                blob = ensure_blob(cache_dir, f.sha256, f.size, fetch_blob)
                dest = os.path.join(root_dir, *f.path.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                _place(blob, dest, f.mode & 0o555)  # read-only, no setuid bits
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not lost to a concurrent builder: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def blob_path(cache_dir: str, sha256: str) -> str:
    """Where the blob with this sha256 lives in the node's cache."""
    return os.path.join(cache_dir, "blobs", sha256[:2], sha256)


def ensure_blob(cache_dir: str, sha256: str, size: int, fetch_blob: Callable[[str], bytes]) -> str:
    """The cached blob's path, fetching and verifying it first when missing."""
    path = blob_path(cache_dir, sha256)
    if os.path.isfile(path):
        return path
    data = fetch_blob(sha256)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"blob {sha256} was fetched with content of sha256 {actual}; refused")
    if len(data) != size:
        raise ValueError(f"blob {sha256} is {len(data)} bytes but the manifest says {size}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{sha256}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, BLOB_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _place(blob: str, dest: str, mode: int) -> None:
    """Hardlink the blob at ``dest`` when its mode fits (links share it), else copy it."""
    if stat.S_IMODE(os.stat(blob).st_mode) == mode:
        try:
            os.link(blob, dest)
            return
        except OSError:
            pass  # another filesystem, or links unsupported: copy instead
    shutil.copyfile(blob, dest)
    os.chmod(dest, mode)
