"""``images/snapshot.py``: a writable layer (an overlayfs upper directory) as a tar and
back, with overlayfs' whiteouts and opaque folders kept; a tar that would write outside
the layer or make a device is refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from strato.images.errors import ImageBuildError
from strato.images.snapshot import OPAQUE_XATTR, pack_layer, unpack_layer
from strato.protocol import images

ROOT = os.geteuid() == 0


def _upper(tmp_path: Path) -> Path:
    upper = tmp_path / "upper"
    (upper / "etc/app").mkdir(parents=True)
    (upper / "etc/app/conf").write_text("x=1\n")
    (upper / "bin").mkdir()
    (upper / "bin/tool").write_text("#!/bin/sh\necho hi\n")
    (upper / "bin/tool").chmod(0o755)
    os.symlink("tool", upper / "bin/alias")
    if ROOT:  # a deleted file of the image and a folder made anew over one of its
        os.mknod(upper / "etc/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
        (upper / "var").mkdir()
        os.setxattr(upper / "var", OPAQUE_XATTR, b"y")
    return upper


def test_a_layer_round_trips(tmp_path: Path) -> None:
    tar, sha, size = pack_layer(_upper(tmp_path), tmp_path / "scratch")
    assert size == tar.stat().st_size and len(sha) == 64
    dest = tmp_path / "layer"
    unpack_layer(tar, dest)
    assert (dest / "etc/app/conf").read_text() == "x=1\n"
    assert os.access(dest / "bin/tool", os.X_OK)
    assert os.readlink(dest / "bin/alias") == "tool"
    if not ROOT:
        print("not root: whiteouts and opaque folders (mknod, trusted xattrs) not checked")
        return
    st = os.lstat(dest / "etc/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(dest / "var", OPAQUE_XATTR) == b"y"
    assert OPAQUE_XATTR not in os.listxattr(dest / "etc")


def test_the_same_files_make_the_same_blob_and_image(tmp_path: Path) -> None:
    _, a, _ = pack_layer(_upper(tmp_path / "1"), tmp_path / "s")
    base = images.debian_slim("3.11")
    spec = images.ImageSpec([base, images.SnapshotLayer(sha256=a, size=1)])
    assert images.image_id(spec) == images.image_id(
        images.ImageSpec([base, images.SnapshotLayer(sha256=a, size=1)])
    )
    with pytest.raises(Exception, match="snapshot_layer: bad blob"):
        images.validate_spec(images.ImageSpec([base, images.SnapshotLayer("nothex", 1)]))


def _tar(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        member.size = len(data)
        t.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_a_tar_that_leaves_the_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="cannot unpack"):
        unpack_layer(_tar(tmp_path, tarfile.TarInfo("../escape"), b"x"), tmp_path / "layer")
    assert not (tmp_path / "escape").exists()
    # a link may point anywhere (inside the container it resolves in its root), but
    # nothing is written through one that leaves the layer
    link = tarfile.TarInfo("out")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
    evil = tmp_path / "evil2.tar"
    with tarfile.open(evil, "w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(link)
        through = tarfile.TarInfo("out/escape")
        through.size = 1
        t.addfile(through, io.BytesIO(b"x"))
    with pytest.raises(ImageBuildError, match="cannot unpack"):
        unpack_layer(evil, tmp_path / "layer2")
    assert not (tmp_path / "escape").exists()
    # an absolute name lands inside the layer
    unpack_layer(_tar(tmp_path, tarfile.TarInfo("/abs/file"), b"x"), tmp_path / "layer3")
    assert (tmp_path / "layer3/abs/file").read_bytes() == b"x"


def test_a_device_that_is_not_a_whiteout_is_refused(tmp_path: Path) -> None:
    dev = tarfile.TarInfo("dev/sda")
    dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
    with pytest.raises(ImageBuildError, match="a device, not a whiteout"):
        unpack_layer(_tar(tmp_path, dev), tmp_path / "layer")
