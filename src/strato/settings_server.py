"""Settings of the control plane: its API, database and channel, the cluster (joined
worker agents, Ray), the broker, per-app quotas, the listeners and the web gateway.
Re-exported by ``strato.settings``."""

from __future__ import annotations

from strato.settings_base import (
    CLIENT,
    POSITIVE,
    SERVER,
    WORKER,
    Range,
    Setting,
    _const,
    _declare,
    _parse_backoff,
    flag,
    integer,
    number,
    optional_integer,
    path,
    text,
)

# ======================================================================================
# The control plane

HOST = text(
    "STRATO_HOST", "127.0.0.1", "The address the control plane's HTTP API listens on.", (SERVER,)
)
PORT = integer(
    "STRATO_PORT",
    7749,
    "The port of the control plane's HTTP API.",
    (SERVER,),
    unit="port",
    within=Range(0, 65535),
)
DATABASE_URL = text(
    "STRATO_DATABASE_URL",
    "",
    "The control plane's database, as an SQLAlchemy URL (for instance "
    "`postgresql+psycopg://user@host/db`).",
    (SERVER,),
    shown_default="SQLite in `$STRATO_HOME/state.db`",
    kind="url",
)
BLOB_THRESHOLD = integer(
    "STRATO_BLOB_THRESHOLD",
    1 << 20,
    "Payloads (arguments, results) over this size go to the blob store; the message "
    "carries their key.",
    (SERVER,),
    unit="bytes",
)
BLOB_GC_INTERVAL_S = number(
    "STRATO_BLOB_GC_INTERVAL_S",
    3600.0,
    "How often the control plane deletes blobs no row names any more (calls' payloads, "
    "Dict values, volume blocks, code, image files); 0: never (`strato server gc-blobs` "
    "still does on demand).",
    (SERVER,),
    within=Range(0),
)
BLOB_GC_GRACE_S = number(
    "STRATO_BLOB_GC_GRACE_S",
    86400.0,
    "How old an unreferenced blob must be before the blob collector deletes it (an "
    "upload in flight, or a key a client has not yet named in a row, is younger).",
    (SERVER,),
    within=Range(0),
)
MAX_PAYLOAD = integer(
    "STRATO_MAX_PAYLOAD",
    256 << 20,
    "The largest payload (arguments or a result) the control plane accepts; larger data "
    "goes through a Volume.",
    (SERVER,),
    unit="bytes",
    within=Range(1),
)
VOLUME_MAX_BYTES = integer(
    "STRATO_VOLUME_MAX_BYTES",
    1 << 40,
    "The most bytes of files one Volume may hold; a commit or upload that would go over "
    "it is refused and changes nothing.",
    (SERVER,),
    unit="bytes",
    within=Range(1),
)
OUTPUT_RETENTION = number(
    "STRATO_OUTPUT_RETENTION",
    7 * 86400.0,
    "How long a call's outputs are kept before they are deleted.",
    (SERVER,),
)
SECRET_KEY_FILE = path(
    "STRATO_SECRET_KEY_FILE",
    "`$STRATO_HOME/secret.key`",
    "The file of the key that encrypts Secrets in the database (32 random bytes, "
    "base64; made with mode 0600 when missing). Keep it apart from the database and its "
    "backups: without it the secrets cannot be read.",
    (SERVER,),
)
DICT_TTL = number(
    "STRATO_DICT_TTL",
    7 * 86400.0,
    "How long a Dict entry is kept without being read or written (Modal's 7 days).",
    (SERVER,),
)
RUNTIME = text(
    "STRATO_RUNTIME",
    "",
    "The container runtime: `bwrap`, `gvisor` or `process`.",
    (SERVER, WORKER),
    shown_default="`bwrap` where bubblewrap is installed, else `process`",
)
SANDBOX_RUNTIME = text(
    "STRATO_SANDBOX_RUNTIME",
    "",
    "The runtime of sandboxes created without `runtime=`: `gvisor`, `bwrap` or `process`.",
    (SERVER,),
    shown_default="`gvisor` where runsc is installed, else `bwrap`",
    choices=("gvisor", "bwrap", "process"),
)
SANDBOX_WARM_POOL = integer(
    "STRATO_SANDBOX_WARM_POOL",
    0,
    "Sandboxes kept started ahead, for the default runtime with no image and default "
    "resources: `Sandbox.create` hands one out (and another is started). Each idle one "
    "holds its runtime's memory.",
    (SERVER,),
    within=Range(0, 64),
)
SANDBOX_CPU = number(
    "STRATO_SANDBOX_CPU",
    1 / 64,
    "The CPU a sandbox created without `cpu=` reserves, in cores: small, so that many idle "
    "ones fit on a node. It has no limit: it bursts to idle cores, and under contention "
    "gets as much CPU as any container that reserved up to a core (its cgroup's weight).",
    (SERVER,),
    unit="number",
    within=Range(1 / 1024, 64.0),
)
SANDBOX_AGENT = text(
    "STRATO_SANDBOX_AGENT",
    "",
    "The agent inside sandboxes of the isolating runtimes: `native` (a static C binary the "
    "worker compiles with `cc` on first use; a sandbox starts without an interpreter) or "
    "`python`.",
    (WORKER,),
    shown_default="`native` where it builds (a C compiler and a static libc), else `python`",
    choices=("native", "python"),
)
SANDBOX_DISK_MB = integer(
    "STRATO_SANDBOX_DISK_MB",
    4096,
    "The size of each writable folder of a sandbox created without `ephemeral_disk=`, in "
    "MiB (its image's writable layer, `/tmp`, `/dev/shm`...): writes past it fail with "
    "ENOSPC. These folders are in memory (tmpfs), counted against the sandbox's memory.",
    (SERVER,),
    unit="MiB",
    within=Range(1, 1 << 20),
)
LOCAL_WORKER = flag(
    "STRATO_LOCAL_WORKER",
    True,
    "Whether the control plane starts a worker agent for this machine (the `local` provider).",
    (SERVER,),
)
MAX_FRAME = integer(
    "STRATO_MAX_FRAME",
    16 << 20,
    "The largest channel frame a container may send (kept from 4 MiB to 4 GiB; 0: the "
    "default); a container sending more is dropped. A worker agent may send max(this, "
    "64 MiB).",
    (SERVER,),
    unit="bytes",
)
WORKER_HEARTBEAT_TIMEOUT = number(
    "STRATO_WORKER_HEARTBEAT_TIMEOUT",
    30.0,
    "A worker agent silent for this long is counted lost, with its containers.",
    (SERVER,),
    within=Range(0.0, 86400.0, lo_open=True),
)
# --- cluster: begin
AGENT_PORT = optional_integer(
    "STRATO_AGENT_PORT",
    "the API's port + 2 when `STRATO_HOST` is not loopback, else no listener",
    "The port worker agents of other machines join on (`strato worker start --server URL "
    "--join-token T`); 0 picks a free one. The address is `STRATO_HOST`.",
    (SERVER, WORKER),
    unit="port",
    within=Range(0, 65535),
)
TLS_CERT = path(
    "STRATO_TLS_CERT",
    "none: plain HTTP and TCP",
    "A PEM certificate (chain): the HTTP API serves HTTPS and the agent listener speaks TLS "
    "with it (clients then use an `https://` `STRATO_SERVER_URL`).",
    (SERVER,),
)
TLS_KEY = path(
    "STRATO_TLS_KEY",
    "in `STRATO_TLS_CERT`",
    "The private key of `STRATO_TLS_CERT`.",
    (SERVER,),
)
TLS_CA = path(
    "STRATO_TLS_CA",
    "none: the system's trust store for `https://` URLs; an agent of an `http://` control "
    "plane joins over plain TCP",
    "The CA bundle (PEM) clients and worker agents verify the control plane's certificate "
    "with (HTTPS and the agents' TLS; never skipped); `strato worker start --tls-ca`.",
    (CLIENT, WORKER),
)
JOIN_TOKEN = text(
    "STRATO_JOIN_TOKEN",
    "",
    "The join token a worker agent of another machine shows (`strato server join-token`).",
    (WORKER,),
    shown_default="-",
)
# --- cluster: end
# --- ray: begin
PROVIDER = text(
    "STRATO_PROVIDER",
    "local",
    "Where the control plane's nodes come from: `local` (this machine, one worker agent) "
    "or `ray` (one worker agent on each node of the Ray cluster at `RAY_ADDRESS`; "
    "`strato server start --provider ray`).",
    (SERVER, CLIENT),
    choices=("local", "ray"),
)
RAY_SHARE = number(
    "STRATO_RAY_SHARE",
    1.0,
    "With `STRATO_PROVIDER=ray`: the share of each Ray node's CPUs, memory and GPUs "
    "(rounded down to whole GPUs) that strato reserves from Ray and offers to containers.",
    (SERVER,),
    unit="number",
    within=Range(0.0, 1.0, lo_open=True),
)
RAY_NODE_RESOURCE = text(
    "STRATO_RAY_NODE_RESOURCE",
    "",
    "With `STRATO_PROVIDER=ray`: only Ray nodes that have this custom resource (`ray start "
    "--resources '{\"strato\": 1}'`) run a strato worker agent.",
    (SERVER,),
    shown_default="every Ray node",
)
RAY_AGENT_HOME = path(
    "STRATO_RAY_AGENT_HOME",
    "`strato-ray-<uid>` in each Ray node's temporary folder",
    "With `STRATO_PROVIDER=ray`: the folder on each Ray node under which its worker agent "
    "keeps its state (code, images, containers), one subfolder per node.",
    (SERVER,),
)
RAY_AUTOSCALER_WAIT_S = number(
    "STRATO_RAY_AUTOSCALER_WAIT_S",
    0.0,
    "With `STRATO_PROVIDER=ray` on an autoscaling Ray cluster: how long work that fits no "
    "current Ray node (a GPU type, or more than any node's share) waits for Ray's "
    "autoscaler to add a node that fits, asked for it with `request_resources`, before it "
    "fails with ResourceUnavailableError (at once where Ray's autoscaler reports the "
    "request infeasible); 0: it fails at once.",
    (SERVER,),
    within=Range(0),
)
# --- ray: end
WORKER_RESTART_BACKOFF = _declare(
    Setting(
        "STRATO_WORKER_RESTART_BACKOFF",
        kind="first,cap",
        parse=_parse_backoff,
        default=_const((0.5, 30.0)),
        shown_default="0.5,30",
        meaning="The local worker agent is restarted after it dies, after a delay that "
        "starts at `first` seconds and doubles up to `cap`.",
        readers=(SERVER,),
        expected="two numbers of seconds, first,cap, with 0 < first <= cap < 86400",
    )
)
WORKER_RESTART_RESET_S = number(
    "STRATO_WORKER_RESTART_RESET_S",
    60.0,
    "A worker agent that stayed up this long restarts with the first delay again.",
    (SERVER,),
    within=Range(0.0, 86400.0, lo_open=True),
)

# --- broker: begin
PROVIDERS_CONFIG = path(
    "STRATO_PROVIDERS_CONFIG",
    "`$STRATO_HOME/providers.toml`",
    "The providers file: which providers the broker may buy nodes from, their limits, "
    "the broker's `max_nodes` and budget per hour, and `sim` faults (docs: the README's "
    "providers section). Absent: no broker, the local node only.",
    (SERVER, CLIENT),
)
SIM_OFFERS = path(
    "STRATO_SIM_OFFERS",
    "`../shared/data/gpu-offers/offers.csv` beside the checkout",
    "The offers catalog (SkyPilot's, 13 providers) that the `sim` providers sell.",
    (SERVER, CLIENT),
)
SIM_TRACES = path(
    "STRATO_SIM_TRACES",
    "`../shared/data/spot-availability` beside the checkout",
    "Spot availability traces: preemption rates of the broker's cost model and the "
    "preemptions `sim` providers replay.",
    (SERVER, CLIENT),
)
# --- broker: end

FAULT_DB_LATENCY_MS = number(
    "STRATO_FAULT_DB_LATENCY_MS",
    0.0,
    "Fault injection for benchmarks and tests: every database statement sleeps this long "
    "first, as if the database were across a network.",
    (SERVER,),
    unit="ms",
    within=Range(0.0),
)

# -- per-app quotas
APP_MAX_CONTAINERS = integer(
    "STRATO_APP_MAX_CONTAINERS",
    1000,
    "Live containers one app may hold; a function whose `min_containers` alone is over it "
    "is refused at deploy.",
    (SERVER,),
    within=Range(1, 1_000_000),
)
APP_MAX_SHARE = number(
    "STRATO_APP_MAX_SHARE",
    1.0,
    "The share of the cluster's CPU and memory one app's containers may reserve.",
    (SERVER,),
    unit="share",
    within=Range(0.01, 1.0),
)
APP_WARM_SHARE = number(
    "STRATO_APP_WARM_SHARE",
    0.5,
    "The share of the cluster a function's warm pool (`min_containers` + "
    "`buffer_containers`) may reserve; more is capped and logged.",
    (SERVER,),
    unit="share",
    within=Range(0.0, 1.0),
)
APP_FAIR_SHARE = number(
    "STRATO_APP_FAIR_SHARE",
    1.0,
    "While another app's function waits for a container, an app holding more than this "
    "share of the cluster starts none and stops its surplus (1.0: off).",
    (SERVER,),
    unit="share",
    within=Range(0.01, 1.0),
)

# -- the listeners: API, gateway and channel
MAX_OPEN_FILES = optional_integer(
    "STRATO_MAX_OPEN_FILES",
    "the hard limit, at most 65536",
    "The control plane's open-file limit, shared out between its listeners.",
    (SERVER,),
    within=Range(1),
)
API_MAX_CONNECTIONS = optional_integer(
    "STRATO_API_MAX_CONNECTIONS",
    "20% of the open files, at most 4096",
    "Client connections the HTTP API holds at once; more get a 503.",
    (SERVER,),
    within=POSITIVE,
)
GATEWAY_MAX_CONNECTIONS = optional_integer(
    "STRATO_GATEWAY_MAX_CONNECTIONS",
    "50% of the open files, at most 20000",
    "Client connections the web gateway holds at once; more get a 503.",
    (SERVER,),
    within=POSITIVE,
)
CHANNEL_MAX_CONNECTIONS = optional_integer(
    "STRATO_CHANNEL_MAX_CONNECTIONS",
    "30% of the open files, at most 20000",
    "Connections of workers, containers and web tunnels the channel holds at once.",
    (SERVER,),
    within=POSITIVE,
)
HEADER_TIMEOUT = number(
    "STRATO_HEADER_TIMEOUT",
    10.0,
    "A connection to the API or the gateway must send a complete request head this soon.",
    (SERVER,),
)
KEEPALIVE_TIMEOUT = number(
    "STRATO_KEEPALIVE_TIMEOUT",
    75.0,
    "An API or gateway connection idle between requests is closed after this long.",
    (SERVER,),
)
MAX_HEADER_BYTES = integer(
    "STRATO_MAX_HEADER_BYTES",
    64 << 10,
    "A request head over this size gets a 431.",
    (SERVER,),
    unit="bytes",
    within=POSITIVE,
)
MAX_HEADERS = integer(
    "STRATO_MAX_HEADERS",
    100,
    "A request with more header lines gets a 431.",
    (SERVER,),
    within=POSITIVE,
)

# -- the web gateway
GATEWAY_HOST = text(
    "STRATO_GATEWAY_HOST",
    "",
    "The address the web gateway listens on.",
    (SERVER,),
    shown_default="`STRATO_HOST`",
)
GATEWAY_PORT = optional_integer(
    "STRATO_GATEWAY_PORT",
    "the API's port + 1, else any free port",
    "The web gateway's port: 0 for any free port, -1 for no gateway. Given, a port that "
    "is taken stops the start.",
    (SERVER,),
    unit="port",
    within=Range(-1, 65535),
)
GATEWAY_URL = text(
    "STRATO_GATEWAY_URL",
    "",
    "The public base URL of web endpoints, printed and returned by `get_web_url()`.",
    (SERVER,),
    shown_default="`http://<gateway host>:<port>`",
    kind="url",
)
WEB_HTTP_LIMIT = number(
    "STRATO_WEB_HTTP_LIMIT",
    150.0,
    "A web request still unanswered after this long gets a 303 to its result.",
    (SERVER,),
)
WEB_MAX_BODY = integer(
    "STRATO_WEB_MAX_BODY",
    4 << 30,
    "A web request body over this size gets a 413.",
    (SERVER,),
    unit="bytes",
    within=POSITIVE,
)
WEB_WAIT_TIMEOUT = number(
    "STRATO_WEB_WAIT_TIMEOUT",
    120.0,
    "How long a web request waits for a container, then it gets a 503.",
    (SERVER,),
)
WEB_MAX_WAITING = integer(
    "STRATO_WEB_MAX_WAITING",
    2000,
    "Web requests waiting for a container per endpoint; more get a 503 at once.",
    (SERVER,),
)
WEB_RESULT_TTL = number(
    "STRATO_WEB_RESULT_TTL",
    600.0,
    "How long the result behind a 303 stays fetchable.",
    (SERVER,),
)
WEB_RESULT_MAX = integer(
    "STRATO_WEB_RESULT_MAX",
    64 << 20,
    "The largest result kept for a 303; a larger one is not kept.",
    (SERVER,),
    unit="bytes",
)
WEB_DRAIN_TIMEOUT = number(
    "STRATO_WEB_DRAIN_TIMEOUT",
    600.0,
    "The longest a replaced version of a web endpoint keeps serving its requests.",
    (SERVER,),
)
WEB_TOKEN = text(
    "STRATO_WEB_TOKEN",
    "",
    "The token `requires_auth` endpoints ask for (header `Strato-Token`); not the API token.",
    (SERVER,),
    shown_default="`$STRATO_HOME/web_token`, made on first start",
)
