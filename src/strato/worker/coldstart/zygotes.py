"""A zygote or template: the process a runtime started (:class:`strato.runtime.forking.
Helper`, or a CRIU restore of one) and the control socket to it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal as _signal
import time
from pathlib import Path

from strato.runtime.forking import Helper

from .channel import Channel
from .criu import checkpointed


class ForkFailed(Exception):
    """A container could not be forked; it starts normally instead."""

    def __init__(self, why: str, *, broken: bool = False) -> None:
        super().__init__(why)
        self.broken = broken
        """strato's own set-up of the fork failed: it would fail again for this runtime
        and image, so forking is off for them a while."""


def kill(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclasses.dataclass(eq=False)
class Zygote:
    key: str
    name: str  # also its cgroup's and hostname's
    kind: str  # "zygote" | "template"
    helper: Helper | None = None
    chan: Channel | None = None
    home: Path | None = None  # a template's own directory (spec), removed with it
    ready: asyncio.Future[bool] | None = None
    children: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    dead: bool = False
    pumps: list[asyncio.Future[None]] = dataclasses.field(default_factory=list)
    restored: bool = False  # a CRIU restore (no child of ours: watched by its channel)
    pid: int | None = None  # the restored process
    ctl_fd: int | None = None  # the number of its control socket, in it
    own_code: bool = False  # started with one app's code bound in place (not every app's)

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.helper.proc if self.helper is not None else None

    @property
    def alive(self) -> bool:
        if self.dead:
            return False
        if self.proc is not None and self.proc.returncode is not None:
            self.dead = True
        return not self.dead

    async def stop(self) -> None:
        self.dead = True
        if self.chan is not None:
            self.chan.close()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            kill(proc.pid, _signal.SIGKILL)
        kill(self.pid, _signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5.0)
        for t in self.pumps:
            t.cancel()
        helper, home = self.helper, self.home
        self.home = None

        def cleanup() -> None:
            if helper is not None:
                helper.release()
            if home is not None and not checkpointed(home):
                shutil.rmtree(home, ignore_errors=True)  # a checkpoint on disk is kept

        await asyncio.to_thread(cleanup)
