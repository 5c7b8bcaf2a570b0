"""Functions for the isolation suites (test_host_visibility, test_network): image-less
functions (the host's interpreter, a minimal root) under each isolating runtime."""

from __future__ import annotations

import os
import socket
import time

import strato

app = strato.App("strato-test-isolation")
RUNTIMES = ("bwrap", "gvisor")


def _probe(paths: list[str]) -> dict:
    """For each path: whether it exists and whether its content can be read."""
    import ctypes
    import errno

    seen = {}
    for p in paths:
        exists = os.path.lexists(p)
        readable = False
        try:
            if os.path.isdir(p):
                os.listdir(p)
            else:
                with open(p, "rb") as f:
                    f.read(1)
            readable = True
        except OSError:
            pass
        seen[p] = {"exists": exists, "readable": readable}
    status: dict[str, str] = {}
    with open("/proc/self/status") as proc_status:
        for line in proc_status:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(fn, *args) -> str:
        ctypes.set_errno(0)
        rc = fn(*args)
        return "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    sys_keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine, -1)
    syscalls = {
        "unshare_user": call(libc.unshare, 0x10000000),  # CLONE_NEWUSER
        "keyctl": call(libc.syscall, sys_keyctl, 0, 0, 0, 0, 0),  # KEYCTL_GET_KEYRING_ID
        "ptrace_attach_1": call(libc.ptrace, 16, 1, 0, 0),  # PTRACE_ATTACH to pid 1
    }
    return {
        "paths": seen,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "euid": os.geteuid(),
        "seccomp": status.get("Seccomp"),
        "cap_eff": status.get("CapEff"),
        "no_new_privs": status.get("NoNewPrivs"),
        "syscalls": syscalls,
        "container_id": os.environ.get("STRATO_CONTAINER_ID"),
        "pid": os.getpid(),
    }


def _interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def _connect(targets: list[list]) -> dict:
    """Try each (host, port): what answered, or the error's name; with the time of the
    attempt (the host's clock)."""
    out = {}
    for host, port in targets:
        at = time.time()
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.settimeout(3)
                try:
                    reply = s.recv(64).decode(errors="replace")
                except OSError as e:
                    reply = f"connected, then {type(e).__name__}"
                out[f"{host}:{port}"] = {"result": f"answered:{reply}", "at": at}
        except OSError as e:
            out[f"{host}:{port}"] = {"result": f"refused:{type(e).__name__}", "at": at}
    return out


def _listen(port: int, seconds: float) -> dict:
    """Listen on every address of the container for ``seconds``; how many connected."""
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(0.2)
    began = time.time()
    accepted = 0
    while time.time() - began < seconds:
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        accepted += 1
        conn.close()
    srv.close()
    return {"began": began, "ended": time.time(), "accepted": accepted}


fns: dict[str, dict] = {}
for rt in RUNTIMES:
    fns[rt] = {
        "probe": app.function(runtime=rt, name=f"probe_{rt}")(_probe),
        "interfaces": app.function(runtime=rt, name=f"interfaces_{rt}")(_interfaces),
        "interfaces_blocked": app.function(
            runtime=rt, block_network=True, name=f"interfaces_blocked_{rt}"
        )(_interfaces),
        "connect": app.function(runtime=rt, name=f"connect_{rt}")(_connect),
        "connect_blocked": app.function(
            runtime=rt, block_network=True, name=f"connect_blocked_{rt}"
        )(_connect),
        "listen": app.function(runtime=rt, name=f"listen_{rt}", timeout=120)(_listen),
    }
