"""The file side of volumes without a control plane: names and paths, scanning a mounted
tree against its base (links and odd files never sent), reloading a tree to a manifest."""

from __future__ import annotations

import hashlib
import os

import msgspec
import pytest

from strato import exceptions as exc
from strato.client import volumes as cv
from strato.protocol import messages as m
from strato.protocol.volumes import check_name, norm_path
from strato.sdk.volume import Volume, volume_mounts


def test_names_and_paths():
    assert check_name("a-b_c.1") == "a-b_c.1"
    for bad in ("", "-a", "a/b", "a b", "x" * 65, None):
        with pytest.raises(exc.InvalidError):
            check_name(bad)
    assert norm_path("/a//b/./c/") == "a/b/c"
    assert norm_path("/", root_ok=True) == ""
    for bad in ("..", "a/../b", "/../x", "a\x00b", "/", "x" * 5000):
        with pytest.raises(exc.InvalidError):
            norm_path(bad)


def test_mount_paths_are_checked():
    v = Volume(name="v")
    assert [x.path for x in volume_mounts({"/data/": v, "/other": v.read_only()})] == [
        "/data",
        "/other",
    ]
    assert volume_mounts({"/x": v.read_only()})[0].read_only
    for bad in ({"rel": v}, {"/": v}, {"/proc/x": v}, {"/run/strato/y": v}, {"/a": v, "/a/b": v}):
        with pytest.raises(exc.InvalidError):
            volume_mounts(bad)
    with pytest.raises(exc.InvalidError):
        volume_mounts({"/x": "not a volume"})


def test_scan_sends_changes_only_and_never_follows_links(tmp_path):
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "keep.txt").write_bytes(b"keep")
    (root / "gone.txt").write_bytes(b"gone")
    puts, deletes, base = cv.scan(str(root), {})
    assert sorted(f.path for f in puts) == ["d/keep.txt", "gone.txt"] and deletes == []
    (root / "gone.txt").unlink()
    (root / "new.txt").write_bytes(b"n" * 10_000)
    os.symlink("/etc/passwd", root / "link")
    os.symlink("/etc", root / "dirlink")
    os.mkfifo(root / "fifo")
    os.utime(root / "d" / "keep.txt", ns=(1, 1))  # touched, same content
    puts, deletes, new_base = cv.scan(str(root), base)
    assert [f.path for f in puts] == ["new.txt"] and deletes == ["gone.txt"]
    assert set(new_base) == {"d/keep.txt", "new.txt"}
    entry = puts[0].entry()
    assert entry.data is None and entry.blocks == [hashlib.sha256(b"n" * 10_000).hexdigest()]
    small = cv.local_file("s", str(root / "d" / "keep.txt")).entry()
    assert small.data == b"keep" and small.blocks == []  # inline


class FakeApi:
    """Serves blobs from a dict, as the control plane's batch route would."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.timeout = 1.0

    def call(self, method, path, body=None, response=None, **kw):
        assert (method, path) == ("POST", "/volume-blobs/get")
        return m.BlobBatch([self.blobs[k] for k in body.keys])

    def get_blob(self, key: str) -> bytes:
        return self.blobs[key]


def test_reload_applies_others_changes_and_keeps_local_ones(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    for name, data in (("same", b"same"), ("theirs", b"old"), ("mine", b"old"), ("deleted", b"x")):
        (root / name).write_bytes(data)
    _, _, files = cv.scan(str(root), {})
    state = cv.VolumeState("vo-1", 1, files)
    (root / "mine").write_bytes(b"changed here")  # not committed yet
    big = b"b" * 20_000
    key = hashlib.sha256(big).hexdigest()
    man = m.VolumeManifest(
        "vo-1",
        2,
        [
            m.VolumeFile("same", 4, 0o644, 1.0, [], b"same"),
            m.VolumeFile("theirs", 3, 0o644, 1.0, [], b"new"),
            m.VolumeFile("mine", 6, 0o644, 1.0, [], b"theirs"),
            m.VolumeFile("sub/big", len(big), 0o600, 1.0, [key]),
        ],
    )
    new = cv.reload_tree(FakeApi({key: big}), str(root), state, man)  # type: ignore[arg-type]
    assert (root / "theirs").read_bytes() == b"new"
    assert (root / "sub" / "big").read_bytes() == big
    assert (root / "mine").read_bytes() == b"changed here"  # a local change is kept
    assert not (root / "deleted").exists()
    assert new.version == 2
    puts, deletes, _ = cv.scan(str(root), new.files)
    assert [f.path for f in puts] == ["mine"] and deletes == []  # still to commit


class OldVolumeFile(msgspec.Struct):
    """A volume's file as the control plane knew it before inline files."""

    path: str
    size: int
    blocks: list[str] = []


class OldVolumeCommit(msgspec.Struct):
    puts: list[OldVolumeFile] = []


def test_a_commit_field_the_control_plane_does_not_know_is_refused_not_dropped():
    # the cause of "b.txt: its blocks hold 0 bytes, not the 1 it claims" in one full
    # run: containers started with the inline-files client while the control plane still
    # ran the code from before it, which dropped ``data`` and saw a file without blocks
    f = cv.LocalFile("b.txt", "/nonexistent", 1, 0o644, 0.0, [hashlib.sha256(b"x").hexdigest()])
    f.data = b"x"
    wire = msgspec.msgpack.encode(m.VolumeCommit([f.entry()]))
    old = msgspec.msgpack.decode(wire, type=OldVolumeCommit).puts[0]
    assert (old.size, old.blocks) == (1, [])
    # now such a field is refused by name, before anything is checked or merged
    assert msgspec.msgpack.decode(wire, type=m.VolumeCommit).puts[0].data == b"x"
    newer = {"puts": [{"path": "b.txt", "size": 1, "chunks": ["k"]}]}
    with pytest.raises(msgspec.ValidationError, match="unknown field `chunks`"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(newer), type=m.VolumeCommit)
    with pytest.raises(msgspec.ValidationError, match="unknown field `puts_v2`"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"puts_v2": []}), type=m.VolumeCommit)
