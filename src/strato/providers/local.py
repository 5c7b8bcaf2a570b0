"""The ``local`` provider: this machine as one node, served by one worker agent process.

The agent is a child of the control plane and exits when its parent does (it watches its
parent's pid), so a restarted control plane never finds two agents for one node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class LocalProvider:
    name = "local"

    def __init__(self, home: Path, channel: str, token: str) -> None:
        self.home = home
        self.channel = channel
        self.token = token
        self.proc: subprocess.Popen | None = None

    def start_worker(self) -> None:
        env = dict(os.environ)
        env.update(
            STRATO_HOME=str(self.home),
            STRATO_WORKER_CHANNEL=self.channel,
            STRATO_TOKEN=self.token,
            STRATO_WORKER_PARENT_PID=str(os.getpid()),
            STRATO_NODE_PROVIDER=self.name,
        )
        log = open(self.home / "logs" / "worker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strato.worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop_worker(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
