"""Functions for the cold-start tests: containers forked from a zygote, and classes whose
``@enter(snap=True)`` state comes from a memory snapshot."""

from __future__ import annotations

import os
import socket
import time
import uuid

import strato
from strato import enter, method

app = strato.App("test-cold-start")

SNAP_LOADS = 0  # how many times a snap hook ran in this process (and those forked from it)


def _forked() -> bool:
    """Forked from a zygote or template: the process is the fork server's image."""
    with open("/proc/self/cmdline", "rb") as f:
        return b"strato.container.zygote" in f.read()


def _capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return -1


def _seccomp() -> str:
    """The seccomp mode of this process (2: a filter)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return line.split()[1]
    return ""


def _reaches(port: int) -> bool:
    """Whether 127.0.0.1:``port`` (a port of the host's loopback) answers from here."""
    if not port:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _isolation(host_port: int) -> dict:
    """What the isolation checks read: seccomp, the host uid of this root, the network."""
    uid, host_uid = os.getuid(), None
    with open("/proc/self/uid_map") as f:
        for line in f:  # inside, outside, count: where this uid is on the host
            inside, outside, count = map(int, line.split())
            if inside <= uid < inside + count:
                host_uid = outside + uid - inside
    return {
        "seccomp": _seccomp(),
        "uid": uid,
        "host_uid": host_uid,
        "reaches_host": _reaches(host_port),
        "interfaces": sorted(n for _, n in socket.if_nameindex()),
        "etc_shadow": os.path.exists("/etc/shadow"),
    }


def _processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


@app.function(scaledown_window=2, max_containers=2)
def where(marker: str, hold_s: float = 0.0, host_port: int = 0) -> dict:
    """Leave a mark in /tmp, wait, then report what this container sees (and take the
    mark away: under the ``process`` runtime /tmp is the host's)."""
    with open(f"/tmp/mark-{marker}", "w") as f:
        f.write(marker)
    time.sleep(hold_s)
    tmp = sorted(os.listdir("/tmp"))
    os.unlink(f"/tmp/mark-{marker}")
    return {
        "marker": marker,
        "forked": _forked(),
        "pid": os.getpid(),
        "pids": [p for p in os.listdir("/proc") if p.isdigit()],
        "processes": _processes(),
        "tmp": tmp,
        "hostname": socket.gethostname(),
        "container_id": os.environ.get("STRATO_CONTAINER_ID"),
        "cap_sys_admin": bool(_capabilities() & (1 << 21)),
        "run": sorted(os.listdir("/run/strato")) if os.path.isdir("/run/strato") else [],
        "env_token": os.environ.get("STRATO_CONTAINER_TOKEN", "")[:4],
        **_isolation(host_port),
    }


image = strato.Image.debian_slim().pip_install("humanize")  # as apps/isolated.py: cached


@app.function(image=image, scaledown_window=2, max_containers=2)
def in_image(marker: str, hold_s: float = 0.0, host_port: int = 0) -> dict:
    """Write in the image's root (a writable layer of its own), wait, report what it sees."""
    import humanize  # only in the image

    with open(f"/root/mark-{marker}", "w") as f:
        f.write(marker)
    time.sleep(hold_s)
    with open("/etc/os-release") as f:
        debian = "Debian" in f.read()
    return {
        "marker": marker,
        "forked": _forked(),
        "pid": os.getpid(),
        "pids": [p for p in os.listdir("/proc") if p.isdigit()],
        "root": sorted(os.listdir("/root")),
        "debian": debian,
        "humanize": humanize.naturalsize(2_000_000),
        "cap_sys_admin": bool(_capabilities() & (1 << 21)),
        "run": sorted(os.listdir("/run/strato")),
        "mounts": [line.split()[4] for line in open("/proc/self/mountinfo")],
        **_isolation(host_port),
    }


@app.function(scaledown_window=2, block_network=True)
def offline() -> dict:
    """In its own network namespace: only a loopback, which works."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    return {"forked": _forked(), "interfaces": sorted(n for _, n in socket.if_nameindex())}


@app.cls(enable_memory_snapshot=True, scaledown_window=2)
class Snapped:
    @enter(snap=True)
    def load(self) -> None:
        global SNAP_LOADS
        SNAP_LOADS += 1
        self.snap_token = uuid.uuid4().hex
        self.snap_env = os.environ.get("STRATO_CONTAINER_ID")
        self.snap_caps = _capabilities()  # user code in the template: it must hold none

    @enter()
    def warm(self) -> None:
        self.enter_token = uuid.uuid4().hex
        self.enter_env = os.environ.get("STRATO_CONTAINER_ID")

    @method()
    def state(self) -> dict:
        return {
            "snap": self.snap_token,
            "enter": self.enter_token,
            "loads": SNAP_LOADS,
            "container_id": os.environ.get("STRATO_CONTAINER_ID"),
            "enter_saw": self.enter_env,
            "forked": _forked(),
            "snap_caps": self.snap_caps,
        }


@app.cls(enable_memory_snapshot=True, scaledown_window=2)
class OtherSnapped:
    @enter(snap=True)
    def load(self) -> None:
        self.snap_token = uuid.uuid4().hex

    @method()
    def state(self) -> dict:
        return {"snap": self.snap_token, "forked": _forked()}


@app.cls(scaledown_window=2)
class Unsnapped:
    @enter(snap=True)
    def load(self) -> None:
        global SNAP_LOADS
        SNAP_LOADS += 1
        self.snap_token = uuid.uuid4().hex

    @method()
    def state(self) -> dict:
        return {"snap": self.snap_token, "loads": SNAP_LOADS, "forked": _forked()}


@app.cls(enable_memory_snapshot=True, scaledown_window=2)
class BrokenSnap:
    @enter(snap=True)
    def load(self) -> None:
        raise RuntimeError("this snap hook fails")

    @method()
    def state(self) -> str:
        return "unreachable"
