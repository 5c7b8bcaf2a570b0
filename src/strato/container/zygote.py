"""The fork server of a zygote or a memory-snapshot template (the in-container side).

A worker agent starts this module (``python -m strato.container.zygote``) through its
runtime, with a control socket (``$STRATO_ZYGOTE_FD``, ``SOCK_SEQPACKET``). It imports
strato's container runtime and the declared imports (``$STRATO_PREIMPORT``, comma
separated); a *template* (``$STRATO_ZYGOTE_MODE=template``) also imports the function's
code and runs its ``@enter(snap=True)`` hooks (:mod:`strato.container.snapshot`). Then it
answers ``Ready`` and serves fork requests (:mod:`strato.protocol.zygote`: one
``ForkRequest`` plus file descriptors
(stdout, stderr, a private control socket for the new container, and the ``tasks`` /
``cgroup.procs`` files of the container's cgroup, opened by the worker)).

Each request forks a *monitor* (C), which

1. joins the container's cgroup (writes ``0`` to the files it was handed: only itself
   moves, without the cgroup core's global lock) and reports its pid (the worker reads it
   with ``SO_PASSCRED``, translated to the host's PID namespace);
2. where the runtime isolates (``isolate``), makes a new user namespace (uid 0 mapped to
   itself, nothing else) and with it new mount, PID, IPC, UTS, cgroup and network
   namespaces (for ``egress``, the worker attaches a user-mode network stack to the new
   network namespace while the mounts are made; with ``block_network`` it has only a
   loopback); mounts a fresh ``/tmp``, ``/dev/shm`` and
   ``/run`` (the channel socket and the app's code bound back in, the spec written), and
   sets the hostname. With an image (``layers``: the image's layers, which the zygote sees
   under ``/run/strato/layers``) it builds a root of its own: an overlay of the layers
   with a writable layer in memory, ``/dev`` and ``/sys`` bound in;
3. forks the container's main process (G), waits for it and reports how it ended.

G is PID 1 of the new PID namespace: it mounts its own ``/proc`` (read-only: the kernel
lets a user namespace mount proc only as restrictive as one already visible, the empty
read-only proc the worker binds at ``/run/strato/.proc``), moves into its own root where it
has one (``pivot_root``; the zygote's tree is then detached), drops every capability but
Docker's default set (also from the bounding set), loads the runtime's seccomp filter
(:mod:`strato.runtime.seccomp`, sent with the request), reports its pid, takes the container's
environment from the request (never the template's; ``/proc/<pid>/environ`` shows it too),
and runs :func:`strato.container.runner.main`: it dials the control plane itself, over a
fresh socket. Everything before G reports is strato's code; a failure there is reported to
the worker, which then starts the container normally.

Differences from a container started by bwrap: its capabilities hold in its own user
namespace only, its ``/proc`` is read-only, ``setgroups`` is denied, and an image's
writable layer is in memory.

This module is the fork server, the monitor and the container's start; the namespaces,
mounts, root, capabilities and environment they set up are ``zygote_isolation.py``'s.

Only the standard library and what the container runtime imports anyway are used here.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import sys
import traceback

from strato import settings
from strato.protocol import zygote as zp

from .zygote_isolation import (
    PR_SET_PDEATHSIG,
    become,
    close_other_fds,
    drop_capabilities,
    enter_root,
    isolate,
    libc,
    load_seccomp,
    mount_proc,
    send,
    show_environment,
)

# ------------------------------------------------------------------------- the server

MAX_REQUEST = 1 << 20
MAX_FDS = 16

# what a web endpoint's container imports to serve (strato.container.web): pre-imported
# where the environment has it, so that the first request to an endpoint at zero does not
# wait for uvicorn's imports (~90 ms here)
WEB_SERVING = "uvicorn.config uvicorn.server uvicorn.protocols.http.httptools_impl uvloop"


def main() -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # goes with the worker
    fd = settings.ZYGOTE_FD.required()
    assert fd is not None
    ctl = socket.socket(fileno=fd)
    ready = zp.Ready(True)
    try:
        import strato.container.runner  # noqa: F401 - the point of a zygote
        from strato.container import snapshot

        missing = snapshot.preimport(" ".join(settings.PREIMPORT.get()))
        snapshot.preimport("strato.runtime.seccomp")  # what a forked container loads
        snapshot.preimport(WEB_SERVING)  # where installed: a web endpoint's first request
        ready.missing = missing
        if settings.ZYGOTE_MODE.get() == "template":
            snapshot.load_template()
    except BaseException as e:  # noqa: BLE001 - told to the worker, which starts normally
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        ctl.sendall(zp.encode(zp.Ready(False, error=f"{e!r}", tb=text)))
        sys.exit(1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctl.sendall(zp.encode(ready))
    serve(ctl)


def serve(ctl: socket.socket) -> None:
    fd_size = array.array("i").itemsize
    while True:
        try:
            data, ancdata, _, _ = ctl.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * fd_size))
        except InterruptedError:
            continue
        if not data:
            return  # the worker is gone
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % fd_size])
                fds.extend(arr)
        try:
            request = zp.decode_request(data)
            pid = os.fork()
        except BaseException:  # noqa: BLE001 - a bad request must not end the zygote
            traceback.print_exc()
            pid = -1
        if pid == 0:
            code = 70
            try:
                ctl.close()
                code = _monitor(request, fds)
            finally:
                os._exit(code)
        for f in fds:
            os.close(f)


# ------------------------------------------------------------------------- the monitor (C)


def _monitor(req: zp.ForkRequest, fds: list[int]) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    stdout, stderr, ctl_fd, *cgroup_fds = fds
    ns_fds: list[int] = []
    if req.premade and len(cgroup_fds) >= 2:  # a user and network namespace, made
        cgroup_fds, ns_fds = cgroup_fds[:-2], cgroup_fds[-2:]
    ctl = socket.socket(fileno=ctl_fd)
    try:
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for f in cgroup_fds:
            os.write(f, b"0")  # this thread (the whole process: it has one) joins
        for f in {devnull, stdout, stderr, *cgroup_fds}:
            if f > 2:
                os.close(f)
        close_other_fds(keep={ctl.fileno(), *ns_fds})
        send(ctl, zp.MonitorUp())  # SO_PASSCRED gives the worker this pid
        root = isolate(req, ctl, ns_fds) if req.isolate else ""
        pid = os.fork()
    except BaseException as e:  # noqa: BLE001 - reported; the worker starts it normally
        send(ctl, zp.SetupFailed(f"{type(e).__name__}: {e}"))
        return 1
    if pid == 0:
        try:
            _container(req, ctl, root)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        send(ctl, zp.Exited(None, os.WTERMSIG(status)))
    else:
        send(ctl, zp.Exited(os.WEXITSTATUS(status), None))
    return 0


# ------------------------------------------------------------------------- the container (G)


def _container(req: zp.ForkRequest, ctl: socket.socket, root: str) -> None:
    os.setsid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        if req.isolate:
            # its own proc, while the empty one still proves it may (then its root, if any)
            mount_proc(root + "/proc")
            if root:
                enter_root(root)
                os.makedirs(req.workdir or "/", exist_ok=True)
            if req.user:
                become(*req.user)
            else:
                drop_capabilities(req.caps)
            if req.seccomp:  # last: it forbids mounts and new namespaces
                load_seccomp(req.seccomp)
        env = req.env
        os.environ.clear()
        os.environ.update(env)
        show_environment(env)
        try:
            os.chdir(req.workdir or "/")
        except FileNotFoundError:
            if root:  # (made above)
                raise
            os.chdir("/")  # not in its minimal root: a bwrap container starts at / too
    except BaseException as e:  # noqa: BLE001 - nothing of the user's ran yet
        send(ctl, zp.SetupFailed(f"{type(e).__name__}: {e}"))
        os._exit(1)
    send(ctl, zp.Started())  # SO_PASSCRED gives the worker this pid
    ctl.close()
    sys.argv = [req.argv0 or "strato.container"]
    code = 0
    try:
        from strato.container import runner

        runner.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: print, exit 1
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End like an interpreter that returned from its main module."""
    import atexit
    import threading

    try:
        # join non-daemon threads, as the interpreter does at exit
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
