"""The messages between a worker agent and its zygotes (:mod:`strato.container.zygote`).

They travel over ``SOCK_SEQPACKET`` sockets, one msgpack message per packet, tagged by
their ``t`` field: the zygote's control socket (:class:`Ready`, then one
:class:`ForkRequest` per container, with its file descriptors) and a private socket per
forked container, where the container's monitor and the container itself report
(:data:`ForkReport`) and the worker answers what the monitor waits for
(:data:`WorkerAnswer`). The worker reads the sender's pid of each report from
``SO_PASSCRED``, so no report carries a pid.

Imports msgspec only: the zygote's start path stays lean.
"""

from __future__ import annotations

from typing import Union

import msgspec


class _Message(msgspec.Struct, tag_field="t", omit_defaults=True, forbid_unknown_fields=False):
    pass


class Ready(_Message, tag="ready"):
    """A zygote's first word: it imported what it should (``ok``), or why not."""

    ok: bool
    error: str | None = None
    tb: str | None = None
    """The traceback of ``error``, for the worker's log."""
    missing: list[str] = []
    """Declared imports it could not import (it serves anyway)."""


class ForkRequest(_Message, tag="fork"):
    """Fork one container. File descriptors sent with it: stdout, stderr, the container's
    private control socket, the cgroup files its monitor writes ``0`` to, then (with
    ``premade``) a user and a network namespace made ahead."""

    cid: str
    env: dict[str, str]
    """The container's complete environment (never the zygote's)."""
    workdir: str
    hostname: str = ""
    argv0: str = "strato.container"
    isolate: bool = False
    """Make the namespaces and mounts below; else only the cgroup and the environment."""
    block_network: bool = False
    netns: bool = False
    """A network namespace of its own."""
    egress: bool = False
    """The worker attaches a user-mode network stack to that namespace."""
    user: tuple[int, int] | None = None
    """(uid, gid) it runs as, the same on the host; the worker maps them. ``None``: root of
    its own user namespace, with ``caps``."""
    caps: list[str] = []
    seccomp: bytes | None = None
    """The BPF filter loaded last, before strato's entrypoint."""
    binds: list[tuple[str, str]] = []
    """(source as the zygote sees it, destination) pairs."""
    layers: list[str] = []
    """An image's layers as the zygote sees them, top first: a root of its own."""
    owned: list[str] = []
    """Folders of that root its user gets to write (its home, its workdir)."""
    disk_mb: int | None = None
    """Size in MiB of each of its writable tmpfs folders (its image's writable layer with
    ``/tmp``); ``None``: unlimited."""
    spec_path: str | None = None
    spec: bytes | None = None
    """Written at ``spec_path`` inside the container."""
    premade: bool = False


class MonitorUp(_Message, tag="monitor"):
    """From the monitor, once in the container's cgroup: its pid is the sender's."""


class NamespacesMade(_Message, tag="ns"):
    """From the monitor: its user (and network) namespace exists; map the ids, attach
    egress, then answer."""


class Started(_Message, tag="started"):
    """From the container's main process, just before strato's entrypoint runs."""


class SetupFailed(_Message, tag="error"):
    """strato's own set-up of the fork failed (nothing of the user's ran)."""

    error: str


class Exited(_Message, tag="exit"):
    """From the monitor: how the container's main process ended."""

    code: int | None = None
    signal: int | None = None


class IdsMapped(_Message, tag="mapped"):
    ok: bool
    error: str | None = None


class EgressAttached(_Message, tag="egress"):
    ok: bool
    error: str | None = None


ForkReport = Union[Ready, MonitorUp, NamespacesMade, Started, SetupFailed, Exited]  # noqa: UP007
WorkerAnswer = Union[IdsMapped, EgressAttached]  # noqa: UP007

_reports = msgspec.msgpack.Decoder(ForkReport)
_answers = msgspec.msgpack.Decoder(WorkerAnswer)
_requests = msgspec.msgpack.Decoder(ForkRequest)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: _Message) -> bytes:
    return _encoder.encode(msg)


def decode_report(data: bytes) -> ForkReport:
    """Raises ``msgspec.DecodeError`` (a ``ValueError``) for anything else."""
    return _reports.decode(data)


def decode_answer(data: bytes) -> WorkerAnswer:
    return _answers.decode(data)


def decode_request(data: bytes) -> ForkRequest:
    return _requests.decode(data)
