"""What the isolating runtimes (``bwrap``, ``gvisor``) share: checking a launch, where a
container without an image starts, and the capabilities its root process keeps."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_ENV, CHANNEL_PATH, Bind, ContainerLaunch
from strato.runtime.cgroups import validate_limits

DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""Docker's default set: what the root process of a container may do (no ``CAP_SYS_ADMIN``,
``CAP_NET_ADMIN``, ``CAP_SYS_PTRACE``, ``CAP_SYS_RESOURCE``...)."""

OWN_DIRS = ("/tmp", "/run", "/proc", "/dev", "/sys")
"""Directories a container without an image gets of its own instead of the host's."""


def check_launch(launch: ContainerLaunch) -> None:
    """Raise ``InvalidError`` (or ``FileNotFoundError`` for a missing host path) before
    anything is set up."""
    if not launch.argv:
        raise InvalidError(f"container {launch.container_id}: argv is empty.")
    validate_limits(launch.cpu, launch.memory_mb, launch.pids_max)
    for b in launch.binds:
        if not os.path.isabs(b.dst) or not os.path.isabs(b.src):
            raise InvalidError(f"bind {b.src} -> {b.dst}: both paths must be absolute.")
        if not os.path.exists(b.src):
            raise FileNotFoundError(f"bind source {b.src} does not exist")
    if launch.channel_socket is not None and not os.path.exists(launch.channel_socket):
        raise FileNotFoundError(f"channel socket {launch.channel_socket} does not exist")
    if launch.workdir is not None and not os.path.isabs(launch.workdir):
        raise InvalidError(f"workdir {launch.workdir!r} must be an absolute path.")


def _covered(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def interpreter_binds(launch: ContainerLaunch, hidden: Iterable[str]) -> list[Bind]:
    """Without an image a container sees the host root, but its own ``/tmp`` and ``/run``
    (and empty hidden directories) cover the host's. A program that lives there (a virtual
    environment under /tmp, an editable install's source) would vanish: bind those
    directories back, read-only, at the same paths. The candidates are the program's
    virtual environment and this process's own import path (a worker starts containers
    with its own interpreter)."""
    covered = ("/tmp", "/run", *hidden)
    exe = os.path.abspath(launch.argv[0]) if "/" in launch.argv[0] else ""
    candidates = [sys.prefix, sys.base_prefix, *(p for p in sys.path if p)]
    d = os.path.dirname(exe)
    while exe and d != "/":  # the venv is where pyvenv.cfg is, above the (symlinked) program
        if os.path.exists(os.path.join(d, "pyvenv.cfg")):
            candidates.append(d)
            break
        d = os.path.dirname(d)
    if exe:
        candidates.append(os.path.dirname(os.path.realpath(exe)))
    wanted = sorted(
        {
            os.path.normpath(p)
            for p in candidates
            if os.path.isabs(p) and os.path.isdir(p) and _covered(p, covered)
        }
    )
    roots: list[str] = []
    for p in wanted:  # the outermost of nested directories is enough
        if not any(_covered(p, [r]) for r in roots):
            roots.append(p)
    taken = {b.dst for b in launch.binds}
    return [Bind(p, p, readonly=True) for p in roots if p not in taken]


def host_workdir(launch: ContainerLaunch, hidden: Iterable[str]) -> str:
    """Where a container without an image starts: ``workdir``, else ``cwd`` where the
    container sees it (not under its own /tmp, /run... nor a hidden directory), else /."""
    if launch.workdir is not None:
        return launch.workdir
    cwd = os.path.realpath(launch.cwd)
    for covered in (*OWN_DIRS, *hidden):
        if cwd == covered or cwd.startswith(covered.rstrip("/") + "/"):
            return "/"
    return cwd


def container_environment(launch: ContainerLaunch) -> dict[str, str]:
    """The launch's environment with ``$STRATO_CHANNEL`` pointing at the channel socket's
    place inside the container (``CUDA_VISIBLE_DEVICES`` is the runtime's to set)."""
    env = dict(launch.env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if launch.channel_socket is not None:
        env[CHANNEL_ENV] = f"unix:{CHANNEL_PATH}"
    return env
