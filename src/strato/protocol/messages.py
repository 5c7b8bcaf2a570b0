"""Wire types shared by every side of strato.

HTTP bodies between the client and the control plane are msgpack-encoded structs from
this module (``application/msgpack``). The channel between the control plane and worker
agents / containers carries the tagged ``ChannelMessage`` union in length-prefixed frames
(see ``strato.protocol.frames``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .images import ImageSpec
from .mounts import MountManifest

# --------------------------------------------------------------------------- limits

# Every number that crosses the edge (HTTP bodies, channel frames) is checked on decode:
# msgspec rejects NaN and infinities for floats with both bounds, and out-of-range ints,
# so no peer can put a value into the control plane that its arithmetic cannot take.
# The SDK (``strato.sdk.options``) checks the same ranges with friendlier messages.
MAX_INT = (1 << 62) - 1  # ids, indices, sequence numbers: well inside SQL's BIGINT
MAX_CPU = 4096.0
MAX_MEMORY_MB = 1 << 30  # 1 PiB
MAX_CONTAINERS = 100_000
MAX_TIMEOUT_S = 24 * 3600
MAX_RETRIES = 10
MAX_INPUTS = 10_000  # @concurrent(max_inputs=...)
MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000
MAX_GPU_FALLBACKS = 16

Count = Annotated[int, Meta(ge=0, le=MAX_INT)]
Index = Annotated[int, Meta(ge=0, le=MAX_INT)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e9)]  # finite, non-negative durations
Timestamp = Annotated[float, Meta(ge=0.0, le=1e12)]
Cpu = Annotated[float, Meta(gt=0.0, le=MAX_CPU)]
MemoryMb = Annotated[int, Meta(ge=1, le=MAX_MEMORY_MB)]
Containers = Annotated[int, Meta(ge=0, le=MAX_CONTAINERS)]
PositiveContainers = Annotated[int, Meta(ge=1, le=MAX_CONTAINERS)]
ScaledownWindow = Annotated[float, Meta(ge=2.0, le=3600.0)]
GpuList = Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=MAX_GPU_FALLBACKS)]
# each writable folder of a container (tmpfs), MiB; ranges it may reach (checked by the runtime)
DiskMb = Annotated[int, Meta(ge=1, le=1 << 20)]
CidrList = Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=256)]

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


# --- volumes: begin
VOLUME_NAME_MAX = 64
VOLUME_PATH_MAX = 4096
VolumeName = Annotated[str, Meta(min_length=1, max_length=VOLUME_NAME_MAX)]
VolumePath = Annotated[str, Meta(max_length=VOLUME_PATH_MAX)]
BlockKey = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class VolumeMount(msgspec.Struct, frozen=True):
    """A volume mounted in a function's containers at ``path``. The SDK names it (``name``,
    or the ``volume_id`` of an ephemeral one); the id is filled in when the app is created."""

    path: VolumePath
    volume_id: Annotated[str, Meta(max_length=64)] = ""
    name: VolumeName | None = None
    read_only: bool = False
    create_if_missing: bool = False


# --- volumes: end


# --- secrets and schedules: begin
SECRET_NAME_MAX = 64
SECRET_MAX_KEYS = 1000
SECRET_VALUE_MAX = 64 << 10  # one environment variable's value (the kernel takes 128 KiB)
SecretName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")]
SecretValue = Annotated[str, Meta(max_length=SECRET_VALUE_MAX)]
SecretId = Annotated[str, Meta(pattern=r"^(st-[0-9a-f]{16})?$")]


class SecretRef(msgspec.Struct, frozen=True):
    """A secret whose keys become environment variables of a function's containers: by
    ``name`` (``Secret.from_name``) or by the id of an anonymous one (``from_dict``,
    ``from_dotenv``, ``from_local_environ``, created when the app is). The control plane
    fills in the id of a named one when the app is created. Never a value."""

    secret_id: SecretId = ""
    name: SecretName | None = None
    # the workspace whose secret it is: set by the control plane with the id (the client's
    # value is replaced), so that a container's start finds it by name in that workspace
    workspace: Annotated[str, Meta(max_length=48)] = ""
    required_keys: Annotated[list[EnvName], Meta(max_length=SECRET_MAX_KEYS)] = []


class Schedule(msgspec.Struct, frozen=True):
    """When a deployed function runs by itself: every ``period_s`` seconds
    (``strato.Period``) or at the times of a cron expression in ``timezone``
    (``strato.Cron``); exactly one of the two."""

    period_s: Annotated[float, Meta(ge=1.0, le=100 * 366 * 86400.0)] | None = None
    cron: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    timezone: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"


class CreateSecret(msgspec.Struct):
    """``strato secret create`` (named) or an anonymous secret of an app (``name`` None)."""

    values: Annotated[dict[EnvName, SecretValue], Meta(max_length=SECRET_MAX_KEYS)]
    name: SecretName | None = None
    overwrite: bool = False  # --force: replace the values of an existing named secret


class SecretInfo(msgspec.Struct):
    """What the API says of a secret: never its values."""

    secret_id: str
    name: str | None
    created_at: Timestamp
    updated_at: Timestamp
    n_keys: Count = 0


class SecretList(msgspec.Struct):
    secrets: list[SecretInfo]


class ScheduleInfo(msgspec.Struct):
    app_id: str
    function_id: str
    function_name: str
    schedule: Schedule
    next_run_at: Timestamp
    last_run_at: Timestamp | None = None
    last_call_id: str | None = None


class ScheduleList(msgspec.Struct):
    schedules: list[ScheduleInfo]


# --- secrets and schedules: end


# --- sandboxes: begin (the spec's part; the API and frames are further down)
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


# --- sandboxes: end


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


class ChannelMsg(msgspec.Struct, tag=True, tag_field="t"):
    pass


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


# --- volumes: begin
# A volume's file: its content is the concatenation of ``blocks`` (content-addressed blobs
# of at most VOLUME_BLOCK bytes each).
VOLUME_BLOCK = 8 << 20
VOLUME_INLINE = 4096  # a file up to this size travels and is stored inline, not as a blob


class VolumeFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # a field this side does not know is refused, never dropped: a control plane older
    # than its client once read inline files (``data``) as files without blocks
    path: VolumePath
    size: Annotated[int, Meta(ge=0, le=1 << 50)]
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o644
    mtime: Timestamp = 0.0
    blocks: Annotated[list[BlockKey], Meta(max_length=1 << 24)] = []
    data: Annotated[bytes, Meta(max_length=VOLUME_INLINE)] | None = None  # inline content


class VolumeInfo(msgspec.Struct):
    volume_id: str
    name: str | None
    created_at: Timestamp
    version: Count = 0
    size: Count = 0
    n_files: Count = 0


class VolumeList(msgspec.Struct):
    volumes: list[VolumeInfo]


class CreateVolume(msgspec.Struct):
    name: VolumeName | None = None  # None: an ephemeral volume
    create_if_missing: bool = False
    exists_ok: bool = True  # strato volume create: False (an error when it exists)


class VolumeManifest(msgspec.Struct):
    volume_id: str
    version: Count
    files: list[VolumeFile]


class VolumeCommit(msgspec.Struct, forbid_unknown_fields=True):
    """Changes merged into the latest version: per file, the last commit wins."""

    puts: Annotated[list[VolumeFile], Meta(max_length=1 << 22)] = []
    deletes: Annotated[list[VolumePath], Meta(max_length=1 << 22)] = []
    recursive_deletes: Annotated[list[VolumePath], Meta(max_length=1024)] = []
    missing_ok: bool = True  # False: a delete of a path that is not there is an error


class VolumeVersion(msgspec.Struct):
    version: Count
    size: Count = 0
    n_files: Count = 0


class VolumeCopy(msgspec.Struct):
    src_paths: Annotated[list[VolumePath], Meta(min_length=1, max_length=10_000)]
    dst: VolumePath
    recursive: bool = False  # directories are copied only with recursive=True


class BlobBatch(msgspec.Struct):
    """Small blobs in one request (each stored under its sha256)."""

    blobs: Annotated[list[bytes], Meta(max_length=100_000)]


class BlobKeys(msgspec.Struct):
    keys: Annotated[list[BlockKey], Meta(max_length=100_000)]


# --- volumes: end

# --- state: begin
# Dict and Queue (``strato.Dict``, ``strato.Queue``). Keys, values and items are pickled
# by the SDK; names, partition keys and sizes are checked by the control plane, with
# messages that name the limit.
STATE_NAME_MAX = 64
QUEUE_ITEM_MAX_BYTES = 1 << 20  # Modal's limits
QUEUE_PARTITION_MAX_ITEMS = 5_000
QUEUE_MAX_PARTITIONS = 100_000
QUEUE_PARTITION_KEY_MAX_BYTES = 64
QUEUE_MAX_TTL_S = 365 * 86400
DICT_KEY_MAX_BYTES = 64 << 10
DICT_MAX_BATCH = 10_000  # entries per put request (update() sends several)

StateName = Annotated[str, Meta(max_length=1024)]  # checked with a clearer message
PartitionKey = Annotated[str, Meta(max_length=1024)]  # "": the default partition
ValueBlobKey = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
RequestId = Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{0,64}$")]


class StateLookup(msgspec.Struct):
    name: StateName
    create_if_missing: bool = False


class StateRef(msgspec.Struct):
    object_id: str
    name: str | None = None  # None: ephemeral


class StateList(msgspec.Struct):
    objects: list[StateRef]


class StateCount(msgspec.Struct):
    n: Count


class DictKey(msgspec.Struct):
    key: bytes


class DictEntry(msgspec.Struct, array_like=True):
    key: bytes = b""
    value: bytes | None = None
    blob: ValueBlobKey | None = None  # a value over the blob threshold, in the blob store


class DictValue(msgspec.Struct):
    found: bool
    value: bytes | None = None
    blob: str | None = None


class DictPut(msgspec.Struct):
    entries: Annotated[list[DictEntry], Meta(max_length=DICT_MAX_BATCH)]
    skip_if_exists: bool = False


class DictPage(msgspec.Struct):
    entries: list[DictEntry]
    cursor: Count  # pass it as ``after`` for the next page
    done: bool


class QueuePut(msgspec.Struct):
    items: Annotated[list[bytes], Meta(max_length=QUEUE_PARTITION_MAX_ITEMS)]
    partition: PartitionKey = ""
    partition_ttl: Annotated[float, Meta(gt=0.0, le=QUEUE_MAX_TTL_S)] = 86400.0
    timeout: Seconds = 0.0  # how long to wait for room in a full partition
    request_id: RequestId = ""  # the same id sent again does not put the items twice


class QueuePutResult(msgspec.Struct):
    ok: bool
    reason: str = ""  # why not: the partition is full


class QueueGet(msgspec.Struct):
    n: Annotated[int, Meta(ge=1, le=MAX_INT)] = 1
    partition: PartitionKey = ""
    timeout: Seconds = 0.0  # how long to wait for an item (a long-poll)
    request_id: RequestId = ""  # the same id sent again gets the same items back


class QueueClear(msgspec.Struct):
    partition: PartitionKey = ""
    all: bool = False


class QueueItems(msgspec.Struct):
    items: list[bytes]
    cursor: Count = 0  # iterate: pass it as ``after`` for the next items


# --- state: end

# --- cluster: begin
# A worker agent on another machine relays its containers' channel connections over its
# one connection to the control plane: each container connection is a numbered stream of
# raw channel bytes (``RelayOpen``, ``RelayData`` both ways, ``RelayClose`` both ways).
# The control plane reads each stream exactly as it reads a direct channel connection.

RELAY_CHUNK = 256 << 10  # the most bytes of one stream a RelayData carries


class RelayOpen(ChannelMsg, tag="ropen"):
    conn: Index


class RelayData(ChannelMsg, tag="rdata"):
    conn: Index
    data: Annotated[bytes, Meta(max_length=RELAY_CHUNK)]


class RelayClose(ChannelMsg, tag="rclose"):
    conn: Index


class NodeDetail(msgspec.Struct):
    """A node as ``strato node list|describe`` shows it."""

    node_id: str
    name: str
    provider: str
    state: Literal["ready", "lost", "cordoned", "draining"]
    cpu: float
    cpu_reserved: float
    memory_mb: int
    memory_reserved_mb: int
    gpus: dict[str, int]
    labels: dict[str, str]
    region: str | None
    heartbeat_age_s: float
    containers: list[str]
    lost_reason: str = ""


class NodeDetailList(msgspec.Struct):
    nodes: list[NodeDetail]


# --- cluster: end


# --- sandboxes: begin
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


# --- sandboxes: end

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


# --- broker: begin
class ProviderInfo(msgspec.Struct):
    name: str
    enabled: bool
    kind: str
    offers: int
    spot: bool
    regions: list[str]
    nodes: int  # instances held now
    max_nodes: int | None = None


class InstanceInfo(msgspec.Struct):
    instance_id: str
    provider: str
    offer_id: str
    instance_type: str
    gpu: str | None
    gpu_count: int
    spot: bool
    price_per_hour: float
    state: str  # provisioning | running | preempted | failed | terminated
    node_name: str
    reason: str = ""
    node_id: str | None = None
    for_function: str | None = None  # what it was bought for
    region: str = ""


class OfferInfo(msgspec.Struct):
    """An offer of a provider that sells nothing (joined hosts, Ray's nodes): capacity that
    is already there, at its declared price."""

    provider: str
    offer_id: str
    instance_type: str
    gpu: str | None
    gpu_count: int
    cpu: float
    memory_gib: float
    price_per_hour: float
    region: str = ""


class BrokerStatus(msgspec.Struct):
    configured: bool
    config_path: str
    providers: list[ProviderInfo]
    instances: list[InstanceInfo]  # held now, then the last ended ones
    blocked: list[str]  # "provider/region/gpu until +Ns"
    max_nodes: int
    budget_per_hour: float
    spend_per_hour: float
    failovers: int
    preemptions: int
    moves: int = 0  # nodes cordoned for a cheaper option (rebalance_margin)
    offers: list[OfferInfo] = []  # of the providers that sell nothing (hosts, ray)


class UsageRow(msgspec.Struct):
    key: str
    containers: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    memory_gib_s: float = 0.0
    gpu_s: float = 0.0
    cost: float = 0.0


class UsageReport(msgspec.Struct):
    by: str
    since: float  # unix time
    rows: list[UsageRow]
    total: UsageRow


# --- broker: end


# --- workspaces: workspaces and their API tokens

WorkspaceName = Annotated[str, Meta(min_length=1, max_length=48)]
TokenRole = Annotated[str, Meta(max_length=16)]


class CreateWorkspace(msgspec.Struct):
    name: WorkspaceName


class WorkspaceInfo(msgspec.Struct):
    name: str
    created_at: float


class WorkspaceList(msgspec.Struct):
    workspaces: list[WorkspaceInfo]


class CreateToken(msgspec.Struct):
    role: TokenRole = "developer"  # admin | developer | read-only
    name: Annotated[str, Meta(max_length=64)] = ""


class TokenInfo(msgspec.Struct):
    token_id: str
    workspace: str
    role: str
    name: str
    created_at: float
    revoked: bool


class TokenList(msgspec.Struct):
    tokens: list[TokenInfo]


class NewToken(msgspec.Struct):
    info: TokenInfo
    token: str  # shown once: only its hash is kept


class WhoAmI(msgspec.Struct):
    workspace: str
    role: str
    operator: bool
    token_id: str | None


# --- workspaces: end
