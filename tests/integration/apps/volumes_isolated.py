"""Test app: functions in a Debian image that mount volumes under bwrap and gVisor (the
container runs as the unprivileged user; a mount may be anywhere, even where the image
has no folder)."""

from __future__ import annotations

import os

import strato

app = strato.App("strato-test-volumes-isolated", image=strato.Image.debian_slim())
VOL = "strato-test-ivol"
OTHER = "strato-test-ivol-other"
vol = strato.Volume.from_name(VOL, create_if_missing=True)
other = strato.Volume.from_name(OTHER, create_if_missing=True)
RUNTIMES = ("bwrap", "gvisor")


def _read(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p) as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _write(files: dict[str, str], commit: bool = True, append: bool = False) -> dict:
    """Write (or append to) files under /data/vol (a folder the image lacks), commit; who
    wrote them and what the mount holds then."""
    for rel, text in files.items():
        path = os.path.join("/data/vol", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a" if append else "w") as f:
            f.write(text)
    if commit:
        vol.commit()
    owners = {os.stat(os.path.join("/data/vol", rel)).st_uid for rel in files}
    return {"uid": os.getuid(), "owners": sorted(owners), "files": _read("/data/vol")}


def _read_both(reload: bool = True) -> dict:
    if reload:
        vol.reload()
    return {"vol": _read("/data/vol"), "ro": _read("/ro")}


def _write_read_only(rel: str) -> str:
    """Write into the read-only mount (in place, a new file) and commit it: the errors (an
    errno's name), and whether the mount is read-only."""
    import errno

    with open("/proc/self/mounts") as f:  # the mount's own options
        opts = [ln.split()[3].split(",") for ln in f if ln.split()[1] == "/ro"]
    out = ["ro" if opts and "ro" in opts[-1] else f"rw:{opts}"]
    for target in (os.path.join("/ro", rel), "/ro/new.txt"):
        try:
            with open(target, "a") as f:
                f.write("no")
            out.append("written")
        except OSError as e:
            out.append(errno.errorcode.get(e.errno or 0, type(e).__name__))
    try:
        other.commit()
        out.append("committed")
    except strato.exceptions.InvalidError:
        out.append("InvalidError")
    return ",".join(out)


def _two(tag: str) -> dict:
    """Write one file into each of two writable volumes, commit both."""
    vol.reload()
    other.reload()
    with open(f"/data/vol/{tag}-a.txt", "w") as f:
        f.write("a")
    os.makedirs("/other/sub", exist_ok=True)
    with open(f"/other/sub/{tag}-b.txt", "w") as f:
        f.write("b")
    vol.commit()
    other.commit()
    return {"vol": _read("/data/vol"), "other": _read("/other")}


RW = {"/data/vol": vol, "/ro": other.read_only()}
fns: dict[str, dict] = {}
for _rt in RUNTIMES:
    opts = {"runtime": _rt, "block_network": True, "scaledown_window": 60}
    fns[_rt] = {
        "write": app.function(volumes=RW, name=f"write_{_rt}", **opts)(_write),
        "read": app.function(volumes=RW, name=f"read_{_rt}", **opts)(_read_both),
        "write_read_only": app.function(volumes=RW, name=f"write_ro_{_rt}", **opts)(
            _write_read_only
        ),
        "two": app.function(volumes={"/data/vol": vol, "/other": other}, name=f"two_{_rt}", **opts)(
            _two
        ),
    }
