"""Memory snapshots on disk with CRIU, where ``criu check`` passes (checked once per
worker): a template is checkpointed after its snap hooks (``criu dump --leave-running``,
before it forked anything and without any socket to the control plane) and restored with
``criu restore`` when the template is gone (evicted, or the worker restarted), so the
hooks do not run again."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec

from strato import settings

from .channel import Channel, socketpair

ZYGOTE_MODULE = "strato.container.zygote"
CRIU_TIMEOUT_S = 120.0


class CheckpointFailed(Exception):
    """The checkpoint could not be taken or restored; the message says why."""


def run(argv: list[str], timeout: float, pass_fds: tuple[int, ...] = ()) -> tuple[bool, str]:
    """(succeeded, its last line of output or its exit code)."""
    try:
        p = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    text = (p.stderr or p.stdout or "").strip().splitlines()
    return p.returncode == 0, (text[-1] if text else f"exit code {p.returncode}")


def criu_check(criu: str | None = None) -> tuple[bool, str]:
    """(usable, why not): whether ``criu check`` passes on this kernel."""
    criu = criu or criu_binary()
    if criu is None:
        return False, "criu is not installed (apt-get install criu)"
    if os.geteuid() != 0:
        return False, "criu needs root"
    p_ok, out = run([criu, "check"], 60.0)
    if p_ok:
        return True, ""
    return False, f"`criu check` failed: {out}"


def criu_binary() -> str | None:
    """``$STRATO_CRIU`` (a path), else ``criu`` on the PATH."""
    configured = settings.CRIU.get()
    return str(configured) if configured is not None else shutil.which("criu")


def criu_dump_argv(pid: int, images: Path) -> list[str]:
    return [
        criu_binary() or "criu",
        "dump",
        "--tree",
        str(pid),
        "--images-dir",
        str(images),
        "--leave-running",
        "--shell-job",
        "--ext-unix-sk",
        "--manage-cgroups=ignore",
        "--ext-mount-map",
        "auto",
        "--enable-external-masters",
        "--enable-external-sharing",
        "--log-file",
        "dump.log",
    ]


def criu_restore_argv(images: Path, pidfile: Path, inherit: dict[str, int]) -> list[str]:
    argv = [
        criu_binary() or "criu",
        "restore",
        "--images-dir",
        str(images),
        "--restore-detached",
        "--shell-job",
        "--ext-unix-sk",
        "--manage-cgroups=ignore",
        "--ext-mount-map",
        "auto",
        "--pidfile",
        str(pidfile),
        "--log-file",
        "restore.log",
    ]
    for resource, fd in inherit.items():
        if resource:
            argv += ["--inherit-fd", f"fd[{fd}]:{resource}"]
    return argv


def checkpointed(home: Path) -> bool:
    return (home / "criu" / "done").exists()


async def dump(home: Path, root: int, top: int, ctl_fd: int | None) -> Path:
    """Checkpoint the process tree of ``root`` (a ready template, before it forked
    anything) to ``home``, leaving it running. ``top``: the process the worker started
    (``root`` or an ancestor); ``ctl_fd``: the number of the template's control socket in
    its fork server, handed anew on restore. Raises :class:`CheckpointFailed`."""
    images = home / "criu"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    server = fork_server_pid(top)
    # what CRIU calls the template's end of its control socket, to hand a new one in its
    # place on restore (--inherit-fd)
    fds = {"ctl": fd_resource(server, ctl_fd) if server and ctl_fd else ""}
    ok, out = await asyncio.to_thread(run, criu_dump_argv(root, images), CRIU_TIMEOUT_S)
    if not ok:
        raise CheckpointFailed(f"criu dump failed: {out}")
    (images / "fds.json").write_text(msgspec.json.encode(fds).decode())
    (images / "done").write_text(str(time.time()))
    return images


async def restore(home: Path) -> tuple[Channel, int | None]:
    """Bring a checkpointed template back (``criu restore``): a new control socket takes
    the place of the old one (returned, with the restored pid). Raises
    :class:`CheckpointFailed`."""
    images = home / "criu"
    try:
        old = msgspec.json.decode((images / "fds.json").read_bytes())
    except (OSError, msgspec.DecodeError) as e:
        raise CheckpointFailed(f"the checkpoint is incomplete ({e})") from None
    mine, theirs = socketpair()
    pidfile = images / "restored.pid"
    argv = criu_restore_argv(images, pidfile, {old.get("ctl", ""): theirs.fileno()})
    try:
        ok, out = await asyncio.to_thread(run, argv, CRIU_TIMEOUT_S, (theirs.fileno(),))
    finally:
        theirs.close()
    if not ok:
        mine.close()
        shutil.rmtree(images, ignore_errors=True)
        raise CheckpointFailed(f"criu restore failed: {out}")
    try:
        pid: int | None = int(pidfile.read_text())
    except (OSError, ValueError):
        pid = None
    try:
        os.utime(home)  # in use: not pruned
    except OSError:
        pass
    return Channel(mine), pid


def fd_resource(pid: int, fd: int) -> str:
    """What ``fd`` of process ``pid`` is, as CRIU names it (``socket:[INODE]``)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def fork_server_pid(pid: int) -> int | None:
    """The zygote's Python process: ``pid`` or its descendant running the fork server."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            if ZYGOTE_MODULE.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return None
