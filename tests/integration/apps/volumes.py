"""Functions that mount volumes (the ``process`` runtime: at folders that exist on the
host, bound in the container's own mount namespace)."""

from __future__ import annotations

import os
import shutil

import strato

app = strato.App("strato-test-volumes")
VOL = "strato-test-vol"
OTHER = "strato-test-vol-other"
vol = strato.Volume.from_name(VOL, create_if_missing=True)
other = strato.Volume.from_name(OTHER, create_if_missing=True)

RW = {"/srv": vol, "/media": other.read_only()}


def _read(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p) as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@app.function(runtime="process", volumes=RW, scaledown_window=60)
def write(files: dict[str, str], commit: bool = True, remove: list[str] | None = None) -> dict:
    """Write files under /srv (and remove some), commit; what the mount holds then."""
    for rel, text in files.items():
        path = os.path.join("/srv", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    for rel in remove or []:
        os.unlink(os.path.join("/srv", rel))
    if commit:
        vol.commit()
    return _read("/srv")


@app.function(runtime="process", volumes=RW, scaledown_window=60)
def read(reload: bool = True) -> dict:
    """What /srv holds (after a reload) and what the read-only /media holds."""
    if reload:
        vol.reload()
    return {"srv": _read("/srv"), "media": _read("/media")}


@app.function(runtime="process", volumes=RW, scaledown_window=60)
def write_read_only(rel: str) -> str:
    """Try to write into the read-only mount and to commit it: the errors, by type."""
    out = []
    try:
        with open(os.path.join("/media", rel), "w") as f:
            f.write("no")
        out.append("written")
    except OSError as e:
        out.append(type(e).__name__)
    try:
        other.commit()
        out.append("committed")
    except strato.exceptions.InvalidError as e:
        out.append("InvalidError:" + str(e)[:40])
    return ",".join(out)


@app.function(runtime="process", volumes={"/srv": vol}, scaledown_window=60)
def write_many(n: int, size: int) -> int:
    """Write n small files and commit them; how many."""
    os.makedirs("/srv/many", exist_ok=True)
    for i in range(n):
        with open(f"/srv/many/{i:05d}.txt", "wb") as f:
            f.write(bytes([i % 256]) * size)
    vol.commit()
    return n


@app.function(runtime="process", volumes={"/srv": vol}, scaledown_window=60)
def write_no_commit(rel: str, text: str) -> str:
    with open(os.path.join("/srv", rel), "w") as f:
        f.write(text)
    return rel


@app.cls(runtime="process", volumes={"/srv": vol, "/media": other}, scaledown_window=60)
class Shelf:
    """A class whose containers mount two writable volumes."""

    @strato.method()
    def swap(self) -> dict:
        """Move /srv's files to /media, commit both; what each holds after a reload."""
        vol.reload()
        other.reload()
        for name in os.listdir("/srv"):
            shutil.move(os.path.join("/srv", name), os.path.join("/media", name))
        vol.commit()
        other.commit()
        return {"srv": _read("/srv"), "media": _read("/media")}


def _outcomes(calls) -> list[str]:
    out = []
    for call in calls:
        try:
            call()
            out.append("ok")
        except Exception as e:  # noqa: BLE001 - the test reads the types
            out.append(type(e).__name__)
    return out


@app.function(runtime="process", volumes={"/media": other.read_only()}, scaledown_window=60)
def foreign(volume_id: str, read_only_id: str) -> list[str]:
    """What the control plane lets this container do to a volume it does not mount, and to
    one it mounts read-only, whatever the SDK would refuse first."""
    from strato.client import session
    from strato.protocol import messages as m

    api = session.api()
    drop = m.VolumeCommit(deletes=["keep.txt"])
    return _outcomes(
        [
            lambda: api.call("GET", f"/volumes/{volume_id}/manifest", None, m.VolumeManifest),
            lambda: api.call("POST", f"/volumes/{volume_id}/commit", drop, m.VolumeVersion),
            lambda: api.call("DELETE", f"/volumes/{volume_id}"),
            lambda: api.call("POST", "/volumes", m.CreateVolume("made-inside", True)),
            lambda: vol.commit(),
            lambda: api.call("GET", f"/volumes/{read_only_id}/manifest", None, m.VolumeManifest),
            lambda: api.call("POST", f"/volumes/{read_only_id}/commit", drop, m.VolumeVersion),
        ]
    )


@app.function(runtime="process", volumes={"/srv": vol}, scaledown_window=60)
def write_with_forged_state(rel: str, text: str) -> str:
    """Write a file without committing, after pointing this mount's state file (which the
    worker reads at exit) at a file of the host."""
    state = vol._mounts()[0].state_file
    os.unlink(state)
    os.symlink("/etc/passwd", state)
    with open(os.path.join("/srv", rel), "w") as f:
        f.write(text)
    return rel
