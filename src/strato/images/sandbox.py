"""Run a build command inside an image: an overlay of its layers, in a bwrap sandbox.

The lower layers are mounted read-only with an overlay whose upperdir is the new layer,
in a private mount namespace (``unshare --mount``) that disappears with the command, so no
mount outlives a build. bwrap gives the command its own PID/IPC/UTS namespaces, ``/proc``,
``/dev``, a tmpfs ``/tmp`` and the host's ``/etc/resolv.conf``; the network is shared, so
pip and apt reach the host's mirrors. Needs root (overlay mounts, apt's chown/setuid).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from strato.images.hostconf import Bind

TAIL_LINES = 20
MAX_OVERLAY_OPTS = 4000  # mount(2) takes at most one page of options
_MOUNT_SCRIPT = 'cd "$1" && mount -t overlay strato -o "$2" "$3" && shift 3 && exec "$@"'


@dataclass
class RunResult:
    returncode: int
    tail: list[str]
    """The last :data:`TAIL_LINES` lines of output."""
    timed_out: bool = False


def run_logged(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run ``argv`` (stdin closed, stderr into stdout), pass each output line to
    ``on_line``, and kill its process group after ``timeout`` seconds."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1]
            tail.append(line)
            on_line(line)
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill()
            timed_out.clear()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return RunResult(rc, list(tail), timed_out.is_set())


def overlay_options(layers_dir: Path, lower: Sequence[str], temp: Path) -> str:
    """Mount options with paths relative to ``layers_dir`` (the mount runs there), so that
    many layers fit in one page; ``lower`` is bottom first, overlayfs wants top first."""
    rel = os.path.relpath(temp, layers_dir)
    opts = f"lowerdir={':'.join(reversed(lower))},upperdir={rel}/upper,workdir={rel}/work"
    if len(opts) > MAX_OVERLAY_OPTS:
        raise ValueError(f"too many layers ({len(lower)}) for one overlay mount")
    return opts


def bwrap_args(
    root: str,
    argv: Sequence[str],
    *,
    env: dict[str, str],
    binds: Sequence[Bind] = (),
    cwd: str = "/",
    hostname: str = "strato-build",
    all_caps: bool = True,
    network: bool = True,
) -> list[str]:
    """bwrap over ``root`` (bound read-write) running ``argv`` as root, with its own
    PID/IPC/UTS namespaces, ``/proc``, ``/dev``, a tmpfs ``/tmp``, the host's DNS (and
    network unless ``network=False``) and nothing of the host's environment. Builds keep
    all capabilities (apt chowns and drops to its ``_apt`` user)."""
    args = ["bwrap", "--bind", root, "/", "--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--tmpfs", "/tmp"]
    args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
    for b in binds:
        args += ["--bind" if b.writable else "--ro-bind", b.host, b.dest]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", hostname]
    if not network:
        args.append("--unshare-net")
    args += ["--die-with-parent", "--new-session", "--clearenv"]
    if all_caps:
        args += ["--cap-add", "ALL"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args += ["--chdir", cwd, "--", *argv]
    return args


def overlay_command(cwd: str, options: str, merged: str, inner: Sequence[str]) -> list[str]:
    """``inner`` run over an overlay mounted at ``merged`` in a private mount namespace
    (gone, with the mount, when ``inner`` exits); ``options`` may be relative to ``cwd``."""
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c"]
    return [*argv, _MOUNT_SCRIPT, "strato-overlay", cwd, options, merged, *inner]


def run_in_layers(
    layers_dir: Path,
    lower: Sequence[str],
    temp: Path,
    script: str,
    *,
    env: dict[str, str],
    binds: Sequence[Bind],
    on_line: Callable[[str], None],
    timeout: float,
) -> RunResult:
    """Run ``script`` over the layers ``lower`` (keys under ``layers_dir``, bottom first);
    what it writes lands in ``temp/upper``."""
    for sub in ("upper", "work", "merged"):
        (temp / sub).mkdir(exist_ok=True)
    opts = overlay_options(layers_dir, lower, temp)
    merged = str(temp / "merged")
    inner = bwrap_args(merged, ["/bin/sh", "-c", script], env=env, binds=binds)
    return run_logged(
        overlay_command(str(layers_dir), opts, merged, inner), on_line, timeout=timeout
    )


def run_in_root(
    root: Path,
    script: str,
    *,
    env: dict[str, str],
    on_line: Callable[[str], None],
    timeout: float,
) -> RunResult:
    """Run ``script`` in a plain directory tree (the base layer while it is made)."""
    argv = bwrap_args(str(root), ["/bin/sh", "-c", script], env=env)
    return run_logged(argv, on_line, timeout=timeout)
