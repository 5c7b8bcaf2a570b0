"""Wire types shared by every side of strato.

HTTP bodies between the client and the control plane are msgpack-encoded structs from
this module (``application/msgpack``). The channel between the control plane and worker
agents / containers carries the tagged ``ChannelMessage`` union in length-prefixed frames
(see ``strato.protocol.frames``).

The types of one feature live in a module of their own (``messages_sandboxes``,
``messages_state``, ``messages_cluster``, ``messages_broker``, ``messages_workspaces``,
``messages_volumes``, ``messages_secrets``; the shared limits and ``ChannelMsg`` in
``messages_base``) and are re-exported here, so every side reads them as ``m.Name``.
"""

# ruff: noqa: F401  (the names imported from messages_* are re-exported, not unused)

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .images import ImageSpec
from .messages_base import (
    MAX_BATCH_SIZE,
    MAX_BATCH_WAIT_MS,
    MAX_CONTAINERS,
    MAX_CPU,
    MAX_GPU_FALLBACKS,
    MAX_INPUTS,
    MAX_INT,
    MAX_MEMORY_MB,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    ChannelMsg,
    CidrList,
    Containers,
    Count,
    Cpu,
    DiskMb,
    GpuList,
    Index,
    MemoryMb,
    PositiveContainers,
    ScaledownWindow,
    Seconds,
    Timestamp,
)
from .messages_broker import (
    BrokerStatus,
    InstanceInfo,
    OfferInfo,
    ProviderInfo,
    UsageReport,
    UsageRow,
)
from .messages_cluster import (
    RELAY_CHUNK,
    NodeDetail,
    NodeDetailList,
    RelayClose,
    RelayData,
    RelayOpen,
)
from .messages_sandboxes import (
    SANDBOX_ARG_MAX,
    SANDBOX_CHUNK,
    SANDBOX_MAX_ARGS,
    SANDBOX_MAX_TAGS,
    SANDBOX_SENDS,
    CreateSandbox,
    ExecId,
    ExecRequest,
    ExecStarted,
    FileErrorKind,
    FileOp,
    FileRequest,
    FileResult,
    Pid,
    ProcessOutput,
    ProcessStatus,
    ReturnCode,
    SandboxArgs,
    SandboxConfig,
    SandboxEnv,
    SandboxId,
    SandboxInfo,
    SandboxList,
    SandboxName,
    SandboxPath,
    SandboxStatus,
    SandboxTagMap,
    SandboxTags,
    SandboxTunnels,
    SbChunk,
    SbConfigure,
    SbExec,
    SbExit,
    SbFile,
    SbFileResult,
    SbFlow,
    SbOomCount,
    SbOomQuery,
    SbOutput,
    SbResize,
    SbSnapshot,
    SbSnapshotDone,
    SbStdin,
    SbTunnelHello,
    SbTunnelOpen,
    SnapshotImage,
    StdinWrite,
    Stream,
    TerminalSize,
    TunnelInfo,
    TunnelPort,
    TunnelPorts,
)
from .messages_secrets import (
    SECRET_MAX_KEYS,
    SECRET_NAME_MAX,
    SECRET_VALUE_MAX,
    CreateSecret,
    EnvName,
    Schedule,
    ScheduleInfo,
    ScheduleList,
    SecretId,
    SecretInfo,
    SecretList,
    SecretName,
    SecretRef,
    SecretValue,
)
from .messages_state import (
    DICT_KEY_MAX_BYTES,
    DICT_MAX_BATCH,
    QUEUE_ITEM_MAX_BYTES,
    QUEUE_MAX_PARTITIONS,
    QUEUE_MAX_TTL_S,
    QUEUE_PARTITION_KEY_MAX_BYTES,
    QUEUE_PARTITION_MAX_ITEMS,
    STATE_NAME_MAX,
    DictEntry,
    DictKey,
    DictPage,
    DictPut,
    DictValue,
    PartitionKey,
    QueueClear,
    QueueGet,
    QueueItems,
    QueuePut,
    QueuePutResult,
    RequestId,
    StateCount,
    StateList,
    StateLookup,
    StateName,
    StateRef,
    ValueBlobKey,
)
from .messages_volumes import (
    VOLUME_BLOCK,
    VOLUME_INLINE,
    VOLUME_NAME_MAX,
    VOLUME_PATH_MAX,
    BlobBatch,
    BlobKeys,
    BlockKey,
    CreateVolume,
    VolumeCommit,
    VolumeCopy,
    VolumeFile,
    VolumeInfo,
    VolumeList,
    VolumeManifest,
    VolumeMount,
    VolumeName,
    VolumePath,
    VolumeVersion,
)
from .messages_workspaces import (
    CreateToken,
    CreateWorkspace,
    NewToken,
    TokenInfo,
    TokenList,
    TokenRole,
    WhoAmI,
    WorkspaceInfo,
    WorkspaceList,
    WorkspaceName,
)
from .mounts import MountManifest

# --------------------------------------------------------------------------- states

WebKind = Literal["fastapi", "asgi", "wsgi", "server"]
AppState = Literal["ephemeral", "deployed", "stopped"]
CallKind = Literal["remote", "map", "spawn", "spawn_map", "gen"]
TaskStatus = Literal["success", "failure"]
"""What a container reports for an input (the control plane decides timeouts and deaths)."""
OutputStatus = Literal["success", "failure", "timeout", "cancelled", "died"]
LogStream = Literal["stdout", "stderr", "system", "access"]  # access: the web gateway's lines
NodeRecordState = Literal["ready", "lost"]
ContainerRecordState = Literal["pending", "starting", "ready", "stopping", "stopped"]
"""A container's record: ``pending`` (placed, its worker asked to start it), ``starting``
(its process runs), ``ready`` (it takes inputs), ``stopping``, ``stopped``."""

ErrorType = str
"""The type of an exception as it crosses the wire, beside its message: the class's name
for ``strato.exceptions`` and builtins (``"FunctionTimeoutError"``, ``"ValueError"``),
else ``"module.QualName"``. The caller raises that class where it can import it, else a
``RemoteError`` carrying the name."""


# --------------------------------------------------------------------------- functions


class RetryPolicy(msgspec.Struct, frozen=True):
    max_retries: Annotated[int, Meta(ge=0, le=MAX_RETRIES)] = 0
    backoff_coefficient: Annotated[float, Meta(ge=1.0, le=10.0)] = 2.0
    initial_delay: Annotated[float, Meta(ge=0.0, le=60.0)] = 1.0
    max_delay: Annotated[float, Meta(ge=0.0, le=60.0)] = 60.0

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait before the attempt that follows ``failed_attempts`` failures."""
        d = self.initial_delay * (self.backoff_coefficient ** max(0, failed_attempts - 1))
        return min(d, self.max_delay)


class Resources(msgspec.Struct, frozen=True):
    cpu: Cpu = 0.125
    cpu_limit: Cpu | None = None
    memory_mb: MemoryMb = 128
    memory_limit_mb: MemoryMb | None = None
    gpu: GpuList = []  # ordered fallbacks, canonical "TYPE[:COUNT]" strings


class ScalingConfig(msgspec.Struct, frozen=True):
    min_containers: Containers = 0
    max_containers: PositiveContainers | None = None
    buffer_containers: Containers = 0
    # None: the adaptive keep-alive (strato's default)
    scaledown_window: ScaledownWindow | None = None


# --- web endpoints: begin
class WebConfig(msgspec.Struct, frozen=True):
    """How a function serves HTTP (``@fastapi_endpoint``, ``@asgi_app``, ``@wsgi_app``,
    ``@web_server``); see ``strato.sdk.web`` and ``strato.server.gateway``."""

    kind: WebKind
    label: str  # the URL's label: /<app>/<label>/... and <app>-<label>.localhost
    method: str = "GET"  # fastapi_endpoint: the HTTP method
    docs: bool = False  # fastapi_endpoint: serve /docs and /openapi.json
    requires_auth: bool = False  # the gateway asks for the web token (Strato-Token header)
    port: Annotated[int, Meta(ge=0, le=65535)] = 0  # web_server: the port it listens on
    # web_server: seconds to wait for the port
    startup_timeout: Annotated[float, Meta(gt=0.0, le=3600.0)] = 5.0
    attr: str | None = None  # a class's web method: the attribute that serves it


# --- web endpoints: end


class FunctionSpec(msgspec.Struct, frozen=True):
    """Everything the control plane and a container need to know about one function."""

    name: str  # tag inside the app (qualname)
    module: str  # module to import in the container
    qualname: str
    serialized: bytes | None = None  # cloudpickled function when serialized=True
    is_generator: bool = False
    is_async: bool = False
    mount_id: str | None = None
    resources: Resources = Resources()
    scaling: ScalingConfig = ScalingConfig()
    timeout: Annotated[float, Meta(ge=1.0, le=MAX_TIMEOUT_S)] = 300.0
    retries: RetryPolicy = RetryPolicy()
    env: dict[str, str] = {}
    python_version: str = ""
    # classes (@app.cls): the container builds one instance and serves its methods
    is_class: bool = False
    generator_methods: list[str] = []
    async_methods: list[str] = []
    params: bytes | None = None  # pickled parameter values of a bound class instance
    # input handling (@concurrent, @batched)
    max_inputs: Annotated[int, Meta(ge=1, le=MAX_INPUTS)] = 1
    target_inputs: Annotated[int, Meta(ge=1, le=MAX_INPUTS)] | None = None
    batch_max_size: Annotated[int, Meta(ge=0, le=MAX_BATCH_SIZE)] = 0
    batch_wait_ms: Annotated[int, Meta(ge=0, le=MAX_BATCH_WAIT_MS)] = 0
    enable_memory_snapshot: bool = False
    # where it runs
    image: ImageSpec | None = None
    block_network: bool = False
    ephemeral_disk_mb: DiskMb | None = None  # each writable folder's size; None: unlimited
    cidr_allowlist: CidrList | None = None  # the only ranges it may reach; None: any
    runtime: str | None = None  # bwrap | gvisor | process; None = the worker's default
    volumes: Annotated[list[VolumeMount], Meta(max_length=32)] = []  # --- volumes
    secrets: Annotated[list[SecretRef], Meta(max_length=64)] = []  # --- secrets (ids, no values)
    schedule: Schedule | None = None  # --- schedules: deployed functions only
    sandbox: SandboxConfig | None = None  # --- sandboxes: the container is a sandbox
    # --- broker: begin (where its nodes may be bought: Modal's region=, cloud=,
    # nonpreemptible=)
    region: str | list[str] | None = None
    cloud: str | None = None
    nonpreemptible: bool = False
    # --- broker: end
    web: WebConfig | None = None  # a web endpoint; keep this field last


# --------------------------------------------------------------------------- apps (HTTP)


class CreateApp(msgspec.Struct):
    name: str | None
    functions: list[FunctionSpec]
    deployed: bool = False
    mount: MountManifest | None = None
    detached: bool = False  # an ephemeral app that outlives its client (strato run --detach)


class FunctionRef(msgspec.Struct):
    function_id: str
    name: str
    web_url: str | None = None  # a web endpoint's URL on the gateway


class AppInfo(msgspec.Struct):
    app_id: str
    name: str | None
    state: AppState
    created_at: float
    functions: list[FunctionRef] = []
    n_containers: int = 0


class AppList(msgspec.Struct):
    apps: list[AppInfo]


class MissingBlobs(msgspec.Struct):
    missing: list[str]


class BlobCheck(msgspec.Struct):
    sha256s: list[str]


class BlobGc(msgspec.Struct):
    """``POST /blobs/gc`` (the installation's operator): delete the blobs no row names."""

    dry_run: bool = False  # count what would go; delete nothing


class BlobGcReport(msgspec.Struct):
    kept: int  # blobs kept: named by a row, or younger than the grace period
    kept_young: int  # of them, named by no row but younger than STRATO_BLOB_GC_GRACE_S
    deleted: int  # (would be, on a dry run)
    bytes_freed: int
    marked: int  # distinct keys the rows name
    dry_run: bool


# --------------------------------------------------------------------------- calls (HTTP)


class InputItem(msgspec.Struct, array_like=True):
    idx: Index
    args: bytes | None = None  # pickled (args, kwargs)
    blob: str | None = None  # sha256 of a blob holding the pickled args


class CreateCall(msgspec.Struct):
    # chosen by the client, so that a retried request is idempotent
    call_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
    function_id: str
    inputs: list[InputItem]
    kind: CallKind = "remote"
    closed: bool = True  # no more inputs will follow
    wait: Seconds = 0.0  # seconds to wait for the outputs before answering
    method: str | None = None


class AddInputs(msgspec.Struct):
    inputs: list[InputItem]
    closed: bool = False
    total: Count | None = None


class OutputItem(msgspec.Struct, array_like=True):
    idx: int
    status: OutputStatus
    data: bytes | None = None  # pickled value (success) or pickled exception (failure)
    blob: str | None = None
    # the failure's message; with no error_type (an older control plane) it is
    # "TypeName: message"
    error: str | None = None
    traceback: str | None = None
    seq: int = 0
    gen_index: int | None = None  # for generators: item number; None = final
    error_type: ErrorType | None = None  # the failure's exception type


class Outputs(msgspec.Struct):
    outputs: list[OutputItem]
    last_seq: int
    done: bool = False  # every input has a final output
    n_inputs: int | None = None


class CallStatus(msgspec.Struct):
    call_id: str
    function_id: str
    n_inputs: int
    n_done: int
    closed: bool
    cancelled: bool


class Cancel(msgspec.Struct):
    terminate_containers: bool = False


class FunctionStats(msgspec.Struct):
    backlog: int
    num_total_runners: int


class BindFunction(msgspec.Struct):
    """A class's parameter values and/or option overrides: the function they make."""

    params: bytes | None = None  # pickled dict of parameter values
    overrides: bytes | None = None  # msgpack dict of FunctionSpec fields (with_options)


class UpdateAutoscaler(msgspec.Struct):
    min_containers: Containers | None = None
    max_containers: PositiveContainers | None = None
    buffer_containers: Containers | None = None
    scaledown_window: ScaledownWindow | None = None


# --- call graph: begin
InputStatusName = Literal["PENDING", "SUCCESS", "FAILURE", "INIT_FAILURE", "TERMINATED", "TIMEOUT"]
"""An input's status as Modal's ``InputStatus`` names it."""


class GraphInput(msgspec.Struct):
    """One input of a call graph (``GET /calls/{id}/graph``) and, in ``children``, the
    inputs of the calls its code made, in the order it made them."""

    input_id: str
    function_call_id: str
    task_id: str  # the container that ran it (last), or ""
    status: InputStatusName
    function_name: str
    module_name: str
    children: list[GraphInput] = []


class CallGraph(msgspec.Struct):
    inputs: list[GraphInput]  # the call's own inputs
    truncated: bool = False  # more levels or inputs than one answer carries were left out


# --- call graph: end


# --------------------------------------------------------------------------- logs


class LogLine(msgspec.Struct, array_like=True):
    ts: Timestamp
    container_id: str
    stream: LogStream
    text: str
    seq: Count = 0


class LogBatch(msgspec.Struct):
    lines: list[LogLine]
    cursor: int
    app_state: AppState | Literal[""] = ""  # "": the app is not known


# --------------------------------------------------------------------------- nodes / containers


class NodeInfo(msgspec.Struct):
    name: str
    provider: str
    cpu: Annotated[float, Meta(ge=0.0, le=1 << 20)]
    memory_mb: Annotated[int, Meta(ge=0, le=1 << 40)]
    gpus: dict[str, list[Annotated[int, Meta(ge=0, le=1 << 16)]]] = {}
    region: str | None = None
    price_per_hour: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0
    labels: dict[str, str] = {}


class NodeStatus(msgspec.Struct):
    node_id: str
    info: NodeInfo
    state: NodeRecordState
    cpu_reserved: float
    memory_reserved_mb: int
    last_heartbeat: float


class ContainerInfo(msgspec.Struct):
    container_id: str
    app_id: str
    function_id: str
    function_name: str
    node_id: str
    state: ContainerRecordState
    started_at: float
    exit_reason: str | None = None
    image_id: str | None = None


class ContainerList(msgspec.Struct):
    containers: list[ContainerInfo]


class NodeList(msgspec.Struct):
    nodes: list[NodeStatus]


class ErrorBody(msgspec.Struct):
    error: str  # class name in strato.exceptions
    message: str


class Health(msgspec.Struct):
    version: str
    epoch: str
    pid: int
    max_payload_bytes: int
    blob_threshold_bytes: int


# --------------------------------------------------------------------------- the channel

# A container's and a worker agent's messages share one tagged union, so one reader
# decodes every frame.


# container -> control plane


class ContainerHello(ChannelMsg, tag="hello"):
    container_id: str
    token: str


class ContainerReady(ChannelMsg, tag="ready"):
    pass


class ContainerInitFailed(ChannelMsg, tag="initfail"):
    error: str  # the message (with no error_type, "TypeName: message")
    traceback: str
    exc: bytes | None = None
    error_type: ErrorType | None = None


class TaskInput(msgspec.Struct, array_like=True):
    input_id: Index
    attempt: Index
    args: bytes
    method: str | None = None
    call_id: str | None = None  # the call of the input (strato.current_function_call_id())


class RunInputs(ChannelMsg, tag="inputs"):
    inputs: list[TaskInput]


class TaskOutput(msgspec.Struct, array_like=True):
    input_id: Index
    attempt: Index
    status: TaskStatus
    data: bytes | None = None
    error: str | None = None  # the message (with no error_type, "TypeName: message")
    traceback: str | None = None
    gen_index: Index | None = None  # generator item; None = final output of the input
    duration: Seconds = 0.0  # seconds the user code ran
    # a value over frames.CHUNK travels ahead of its output as BlobChunk frames: its sha256
    blob: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")] | None = None
    error_type: ErrorType | None = None  # the failure's exception type


class TaskOutputs(ChannelMsg, tag="outputs"):
    outputs: list[TaskOutput]


class BlobChunk(ChannelMsg, tag="chunk"):
    """Part of a large value (an output's ``data`` over ``frames.CHUNK``) on its way to
    the control plane's blob store, so that no frame a container sends is large. A value's
    chunks go in order, the last with ``last=True``; the ``TaskOutputs`` that follows
    names it by ``TaskOutput.blob``."""

    data: bytes
    last: bool = False


class CancelInputs(ChannelMsg, tag="cancel"):
    input_ids: list[Index]


class StopContainer(ChannelMsg, tag="stop"):
    grace_s: Seconds = 10.0


# worker agent <-> control plane


class WorkerHello(ChannelMsg, tag="whello"):
    token: str
    node: NodeInfo
    worker_id: str
    running: list[str] = []


class WorkerWelcome(ChannelMsg, tag="welcome"):
    node_id: str
    epoch: str
    http_url: str
    kill: list[str] = []  # containers from an earlier epoch to kill
    # --- cluster: the node credential a joined (remote) agent fetches code, blobs and
    # volumes with (server/cluster/node_credentials.py); never the installation's API token
    api_token: str = ""


class ContainerStart(ChannelMsg, tag="start"):
    container_id: str
    app_id: str
    function_id: str
    spec: FunctionSpec
    mount: MountManifest | None
    gpu_indices: list[Annotated[int, Meta(ge=0, le=1 << 16)]] = []
    channel: str = ""  # address the container dials: "unix:/path" or "tcp:host:port"
    runtime: str | None = None
    token: str = ""  # the container's own secret for its ContainerHello
    # --- secrets: the values of the function's secrets, sent to the worker for this start
    # only (set as environment variables; never stored, logged or written to a file)
    secret_env: dict[str, str] = {}


class ContainerKill(ChannelMsg, tag="kill"):
    container_id: str
    grace_s: Seconds = 0.0
    reason: str = ""


class ContainerStarted(ChannelMsg, tag="started"):
    container_id: str
    pid: Annotated[int, Meta(ge=0, le=MAX_INT)]


class ContainerExited(ChannelMsg, tag="exited"):
    container_id: str
    exit_code: Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)] | None
    signal: Annotated[int, Meta(ge=0, le=255)] | None
    oom_killed: bool
    description: str


class ContainerStartFailed(ChannelMsg, tag="startfail"):
    container_id: str
    error: str  # the message (with no error_type, "TypeName: message")
    error_type: ErrorType | None = None


class Logs(ChannelMsg, tag="logs"):
    lines: list[LogLine]


class Heartbeat(ChannelMsg, tag="hb"):
    running: list[str] = []


# --- nested calls: a container's API requests over its own channel


class ApiRequest(ChannelMsg, tag="api"):
    """A request of the control plane's API made by code in a container (a nested
    ``.remote()``, ``Dict`` access...), answered by an ``ApiResponse`` with the same
    ``req_id``. The container's channel is its credential: only the routes open to
    containers, scoped to its app (``server/api/scope.py``)."""

    req_id: Index
    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: Annotated[str, Meta(max_length=2048)]
    query: Annotated[
        dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=4096)]],
        Meta(max_length=32),
    ] = {}
    body: bytes = b""
    input_id: Index | None = None  # the input the calling code runs (the call's parent)


class ClientHello(ChannelMsg, tag="chello"):
    """First frame of a client on the control plane's machine that sends its API
    requests over the channel socket instead of HTTP (``client/local_channel.py``)."""

    token: Annotated[str, Meta(max_length=512)]
    workspace: Annotated[str, Meta(max_length=48)] = ""  # STRATO_WORKSPACE, if set


class ApiResponse(ChannelMsg, tag="apiresp"):
    req_id: Index
    status: Annotated[int, Meta(ge=100, le=599)]
    body: bytes = b""


# --- web endpoints: begin
class WebTunnelHello(ChannelMsg, tag="webtunnel"):
    """First frame of a connection a web container dials to the channel socket: after it
    the connection carries raw HTTP/1.1 (the gateway writes requests, the container's
    server answers). See ``strato.server.gateway``."""

    container_id: str
    token: str


# --- web endpoints: end


ChannelMessage = (
    ContainerHello
    | WebTunnelHello
    | ContainerReady
    | ContainerInitFailed
    | RunInputs
    | TaskOutputs
    | BlobChunk
    | CancelInputs
    | StopContainer
    | WorkerHello
    | WorkerWelcome
    | ContainerStart
    | ContainerKill
    | ContainerStarted
    | ContainerExited
    | ContainerStartFailed
    | Logs
    | Heartbeat
    | ApiRequest
    | ApiResponse
    | ClientHello
    | SbExec  # --- sandboxes
    | SbStdin
    | SbFlow
    | SbConfigure
    | SbResize
    | SbFile
    | SbOutput
    | SbExit
    | SbFileResult
    | SbOomQuery
    | SbOomCount
    | SbTunnelOpen
    | SbTunnelHello
    | SbSnapshot
    | SbSnapshotDone
    | RelayOpen  # --- cluster
    | RelayData
    | RelayClose
)
