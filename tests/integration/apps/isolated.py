"""Test app: functions in a Debian image, in isolated containers (bwrap and gVisor)."""

from __future__ import annotations

import os
import socket
import subprocess

import strato

image = strato.Image.debian_slim().pip_install("humanize")
app = strato.App("test-isolated", image=image)
RUNTIMES = ("bwrap", "gvisor")


def _environment(host_file: str, project_file: str = "/nonexistent") -> dict:
    import humanize  # only in the image

    with open("/etc/os-release") as f:
        os_release = f.read()
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {
        "humanize": humanize.naturalsize(2_000_000),
        "debian": "Debian" in os_release,
        "sees_host_file": os.path.exists(host_file),
        "sees_project": os.path.exists(project_file),
        "pids": pids,
    }


def _share_tmp(tag: str) -> list[str]:
    with open(f"/tmp/mark-{tag}", "w") as f:
        f.write(tag)
    import time

    time.sleep(1.0)  # both containers are alive at once
    seen = sorted(os.listdir("/tmp"))
    os.unlink(f"/tmp/mark-{tag}")  # the container's own /tmp, or the host's if not isolated
    return seen


def _connect(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(16).decode()
    except OSError as e:
        return f"refused: {type(e).__name__}"


def _allocate(mb: int) -> int:
    blocks = [bytearray(1 << 20) for _ in range(mb)]
    return len(blocks)


def _fork_bomb(n: int) -> str:
    procs, errors = [], 0
    for _ in range(n):
        try:
            procs.append(subprocess.Popen(["sleep", "30"]))
        except OSError:
            errors += 1
    for p in procs:
        p.kill()
    return f"started {len(procs)}, refused {errors}"


fns = {}
for rt in RUNTIMES:
    fns[rt] = {
        "environment": app.function(runtime=rt, name=f"environment_{rt}")(_environment),
        "share_tmp": app.function(runtime=rt, name=f"share_tmp_{rt}", max_containers=4)(_share_tmp),
        "connect": app.function(runtime=rt, name=f"connect_{rt}")(_connect),
        "connect_blocked": app.function(
            runtime=rt, block_network=True, name=f"connect_blocked_{rt}"
        )(_connect),
        "allocate": app.function(runtime=rt, memory=(128, 200), name=f"allocate_{rt}")(_allocate),
        "fork_bomb": app.function(runtime=rt, name=f"fork_bomb_{rt}")(_fork_bomb),
    }
