"""Wire types of sandboxes: a sandbox function's ``SandboxConfig``, the API's bodies
(create, exec, output, stdin, files, tunnels, snapshots) and the channel frames between the
control plane, a sandbox's agent and its worker (``Sb*``). Re-exported by
``strato.protocol.messages``; the sandbox agent's own codec
(``strato.container.sandbox_wire``) mirrors the frames."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .images import ImageSpec
from .messages_base import (
    MAX_INT,
    MAX_TIMEOUT_S,
    ChannelMsg,
    CidrList,
    Count,
    Cpu,
    DiskMb,
    GpuList,
    Index,
    MemoryMb,
    Timestamp,
)
from .messages_secrets import SecretRef
from .messages_volumes import VolumeMount

SANDBOX_MAX_ARGS = 1024
SANDBOX_ARG_MAX = 128 << 10
SandboxArgs = Annotated[
    list[Annotated[str, Meta(max_length=SANDBOX_ARG_MAX)]], Meta(max_length=SANDBOX_MAX_ARGS)
]
SandboxPath = Annotated[str, Meta(max_length=4096)]


class SandboxConfig(msgspec.Struct, frozen=True):
    """What makes a function's container a sandbox: the container runs the sandbox agent
    (``strato.container.sandbox_agent``) instead of serving inputs."""

    sandbox_id: Annotated[str, Meta(pattern="^sb-[0-9a-f]{16}$")]
    entrypoint: SandboxArgs = []  # run at start as process 1; the sandbox ends with it
    workdir: SandboxPath | None = None


SANDBOX_CHUNK = 1 << 20  # one chunk of a process's stdin or output
SANDBOX_MAX_TAGS = 64
SandboxId = Annotated[str, Meta(pattern="^sb-[0-9a-f]{16}$")]
SandboxName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
SandboxTagMap = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=64)], Annotated[str, Meta(max_length=256)]],
    Meta(max_length=SANDBOX_MAX_TAGS),
]
SandboxStatus = Literal["starting", "running", "success", "failure", "timeout", "terminated"]
"""``success``/``failure``: its entrypoint exited (0 / not 0); ``timeout``: it outlived its
``timeout`` or ``idle_timeout``; ``terminated``: ``terminate()``, or it ended otherwise
(the reason says how)."""
Pid = Annotated[int, Meta(ge=1, le=MAX_INT)]
ReturnCode = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]
Stream = Literal[1, 2]  # stdout, stderr
ExecId = Annotated[str, Meta(pattern="^[0-9a-f]{8,32}$")]
SandboxEnv = Annotated[
    dict[
        Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")],
        Annotated[str, Meta(max_length=64 << 10)],
    ],
    Meta(max_length=1000),
]
FileOp = Literal["read", "write", "stat", "ls", "mkdir", "rm", "sync"]  # sync: flush writes
FileErrorKind = Literal[
    "not_found", "exists", "is_dir", "not_dir", "permission", "not_empty", "other"
]
TunnelPort = Annotated[int, Meta(ge=1, le=65535)]
TunnelPorts = Annotated[list[TunnelPort], Meta(max_length=64)]


class CreateSandbox(msgspec.Struct):
    """``Sandbox.create``. ``runtime`` None: the control plane's default for sandboxes
    (gVisor where runsc is installed, else bwrap)."""

    app_id: Annotated[str, Meta(max_length=64)]
    entrypoint: SandboxArgs = []
    image: ImageSpec | None = None
    timeout: Annotated[float, Meta(ge=1.0, le=MAX_TIMEOUT_S)] = 300.0
    idle_timeout: Annotated[float, Meta(ge=1.0, le=MAX_TIMEOUT_S)] | None = None
    workdir: SandboxPath | None = None
    cpu: Cpu | None = None
    memory_mb: MemoryMb | None = None
    gpu: GpuList = []
    block_network: bool = False
    ephemeral_disk_mb: DiskMb | None = None  # None: the control plane's default
    cidr_allowlist: CidrList | None = None
    env: SandboxEnv = {}
    name: SandboxName | None = None
    runtime: Literal["gvisor", "bwrap", "process"] | None = None
    tags: SandboxTagMap = {}
    mount_id: Annotated[str, Meta(max_length=64)] | None = None
    volumes: Annotated[list[VolumeMount], Meta(max_length=32)] = []  # ids filled in
    secrets: Annotated[list[SecretRef], Meta(max_length=64)] = []
    encrypted_ports: TunnelPorts = []  # --- sandbox tunnels: ports reachable from outside
    unencrypted_ports: TunnelPorts = []


class SandboxInfo(msgspec.Struct):
    sandbox_id: str
    app_id: str
    name: str | None
    status: SandboxStatus
    returncode: ReturnCode | None = None
    reason: str = ""
    tags: dict[str, str] = {}
    created_at: Timestamp = 0.0
    runtime: str = ""


class SandboxList(msgspec.Struct):
    sandboxes: list[SandboxInfo]


class SandboxTags(msgspec.Struct):
    tags: SandboxTagMap


class ExecRequest(msgspec.Struct):
    """``sb.exec``; ``exec_id`` (the client's) makes a request sent again start nothing."""

    argv: Annotated[SandboxArgs, Meta(min_length=1)]
    exec_id: ExecId
    workdir: SandboxPath | None = None
    env: SandboxEnv = {}
    timeout: Annotated[float, Meta(ge=1.0, le=MAX_TIMEOUT_S)] | None = None
    pty: bool = False  # a terminal: stdout carries both streams, stderr stays empty
    size: TerminalSize | None = None  # the terminal's, with pty
    secrets: Annotated[list[SecretRef], Meta(max_length=64)] = []  # into its environment


class TerminalSize(msgspec.Struct, array_like=True):
    rows: Annotated[int, Meta(ge=1, le=10_000)]
    cols: Annotated[int, Meta(ge=1, le=10_000)]


class ExecStarted(msgspec.Struct):
    pid: Pid


class ProcessOutput(msgspec.Struct):
    """A process's output from ``offset``; ``eof``: the stream has ended and nothing of it
    is left to read past ``offset + len(data)``."""

    data: bytes
    offset: Count
    eof: bool
    returncode: ReturnCode | None = None


class StdinWrite(msgspec.Struct):
    """Bytes for a process's stdin from ``offset`` (what the control plane already has of
    it is skipped, so a request sent again writes nothing twice); ``eof`` closes it."""

    data: Annotated[bytes, Meta(max_length=SANDBOX_CHUNK)]
    offset: Count
    eof: bool = False


class ProcessStatus(msgspec.Struct):
    returncode: ReturnCode | None = None
    reason: str = ""


class FileRequest(msgspec.Struct):
    """One file operation in a sandbox (``sb.open``/``ls``/``mkdir``/``rm``): ``read``
    up to ``length`` bytes at ``offset``; ``write`` ``data`` at ``offset`` (or at the
    end with ``append``; ``truncate`` first empties the file, creating it if missing);
    ``stat``; ``ls``; ``mkdir`` (``recursive``: with its parents, and no error if it
    exists); ``rm`` (``recursive``: a folder and all it holds). A relative path is from
    the sandbox's working directory."""

    op: FileOp
    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    offset: Count = 0
    length: Annotated[int, Meta(ge=0, le=SANDBOX_CHUNK)] = 0
    data: Annotated[bytes, Meta(max_length=SANDBOX_CHUNK)] = b""
    append: bool = False
    truncate: bool = False
    recursive: bool = False


class FileResult(msgspec.Struct):
    data: Annotated[bytes, Meta(max_length=SANDBOX_CHUNK)] = b""
    size: Count = 0  # stat: the file's size; write: its size after the write
    is_dir: bool = False
    entries: Annotated[list[Annotated[str, Meta(max_length=4096)]], Meta(max_length=100_000)] = []
    error: Annotated[str, Meta(max_length=4096)] | None = None
    error_kind: FileErrorKind | None = None


class TunnelInfo(msgspec.Struct):
    """One port of a sandbox reachable from outside (``sb.tunnels()``): connections to
    ``host:tunnel_port`` (the web gateway's host) reach ``port`` in the sandbox.
    ``tls``: the listener speaks TLS; ``unencrypted``: the port was in
    ``unencrypted_ports`` (plain TCP). ``url``: the port through the web gateway's own
    port (``http://<sandbox-id>-<port>.tunnel.localhost:<gateway port>``, HTTP and
    WebSockets); empty where the gateway is off."""

    port: TunnelPort
    host: str
    tunnel_port: TunnelPort
    tls: bool
    unencrypted: bool
    url: str = ""


class SandboxTunnels(msgspec.Struct):
    tunnels: list[TunnelInfo]


class SnapshotImage(msgspec.Struct):
    """``sb.snapshot_filesystem()``: the sandbox's image with its writable layer on top."""

    image: ImageSpec
    image_id: str


# control plane -> sandbox agent


class SbExec(ChannelMsg, tag="sbexec"):
    pid: Pid
    argv: Annotated[SandboxArgs, Meta(min_length=1)]
    workdir: SandboxPath | None = None
    env: dict[str, str] = {}
    timeout: Annotated[float, Meta(ge=1.0, le=MAX_TIMEOUT_S)] | None = None
    pty: bool = False
    size: TerminalSize | None = None


class SbResize(ChannelMsg, tag="sbresize"):
    pid: Pid
    size: TerminalSize


class SbStdin(ChannelMsg, tag="sbstdin"):
    pid: Pid
    data: Annotated[bytes, Meta(max_length=SANDBOX_CHUNK)] = b""
    eof: bool = False


class SbFile(ChannelMsg, tag="sbfile"):
    req_id: Index
    request: FileRequest


class SbConfigure(ChannelMsg, tag="sbconf"):
    """A sandbox from the warm pool is handed to its driver: its environment, working
    directory and entrypoint (started as process 1)."""

    env: dict[str, str] = {}
    workdir: SandboxPath | None = None
    entrypoint: SandboxArgs = []


class SbFlow(ChannelMsg, tag="sbflow"):
    """Stop (or resume) reading a process's output: the control plane holds as much of it
    unread as it will."""

    pid: Pid
    stream: Stream
    paused: bool


class SbTunnelOpen(ChannelMsg, tag="sbtunopen"):
    """A client connected to a tunnel of ``port``: connect to it inside the sandbox and
    dial the channel again with an ``SbTunnelHello`` of ``conn_id``, then pipe bytes."""

    conn_id: Index
    port: TunnelPort


# sandbox agent -> control plane


class SbTunnelHello(ChannelMsg, tag="sbtunnel"):
    """First frame of a connection a sandbox's agent dials for a tunnel connection
    (``SbTunnelOpen``); raw bytes of the sandbox's port follow. ``error``: the port could
    not be reached (nothing follows)."""

    container_id: Annotated[str, Meta(max_length=64)]
    token: Annotated[str, Meta(max_length=512)]
    conn_id: Index
    error: Annotated[str, Meta(max_length=1024)] = ""


class SbChunk(msgspec.Struct, array_like=True):
    pid: Pid
    stream: Stream
    data: Annotated[bytes, Meta(max_length=SANDBOX_CHUNK)]
    eof: bool = False


class SbOutput(ChannelMsg, tag="sbout"):
    chunks: Annotated[list[SbChunk], Meta(max_length=4096)]


class SbExit(ChannelMsg, tag="sbexit"):
    pid: Pid
    returncode: ReturnCode
    reason: Annotated[str, Meta(max_length=1024)] = ""


class SbFileResult(ChannelMsg, tag="sbfileres"):
    req_id: Index
    result: FileResult


# control plane <-> worker agent: how many processes the OOM killer has killed in a
# sandbox's container (its cgroup), asked when one of its processes died of SIGKILL


class SbOomQuery(ChannelMsg, tag="sboomq"):
    container_id: Annotated[str, Meta(max_length=64)]


class SbOomCount(ChannelMsg, tag="sboomc"):
    container_id: Annotated[str, Meta(max_length=64)]
    count: Count


# control plane <-> worker agent: the writable layer of a sandbox's container, as a blob


class SbSnapshot(ChannelMsg, tag="sbsnap"):
    container_id: Annotated[str, Meta(max_length=64)]
    req_id: Index


class SbSnapshotDone(ChannelMsg, tag="sbsnapdone"):
    container_id: Annotated[str, Meta(max_length=64)]
    req_id: Index
    sha256: Annotated[str, Meta(max_length=64)] = ""
    size: Count = 0
    error: Annotated[str, Meta(max_length=4096)] = ""


SANDBOX_SENDS = (SbOutput, SbExit, SbFileResult)  # what a sandbox's agent may send
