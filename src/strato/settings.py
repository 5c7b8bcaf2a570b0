"""Every ``STRATO_*`` environment variable, declared once: its type, default, meaning and
the processes that read it.

Read a setting with its declaration: ``settings.MAX_FRAME.get()`` (or ``.get(env)`` with
a mapping of your own) returns the typed value, the default where the variable is unset
or empty, and raises :class:`strato.exceptions.SettingError` (an ``InvalidError``) naming
the variable where its value cannot be used. The docs' table (``docs/settings.md``) is
generated from these declarations: ``python -m strato.settings --markdown``.

Only the standard library is imported: the container's start path and the runtimes read
settings too.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from strato.exceptions import SettingError

if TYPE_CHECKING:  # pathlib is imported when a path is read: a container's start needs none
    from pathlib import Path

T = TypeVar("T")
Env = Mapping[str, str]


# the processes that read a setting (a Literal, not an Enum: this module is imported on a
# container's start path, where building an Enum class costs more than all the rest)
Reader = Literal["client", "server", "worker", "container"]
CLIENT: Reader = "client"  # the SDK, the CLI, `strato run`
SERVER: Reader = "server"  # the control plane (API, gateway, channel, local provider)
WORKER: Reader = "worker"  # the worker agent on a node (and the image builder it runs)
CONTAINER: Reader = "container"  # strato's entrypoint inside a container

ZygoteMode = Literal["zygote", "template"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Setting(Generic[T]):
    """One ``STRATO_*`` variable.

    ``parse`` turns the variable's text into the value (raising ``ValueError`` with what it
    expected); ``default`` makes the value of an unset variable; ``shown_default`` is how
    the docs show it. ``internal`` settings are set by strato for its own child processes
    (a container's id, its channel): listed for completeness, never set by hand.
    ``empty_is_unset``: an empty value means the default (false for the few variables where
    an empty value says something, such as "no GPUs").
    """

    def __init__(
        self,
        name: str,
        kind: str,
        parse: Callable[[str], T],
        expected: str,
        default: Callable[[], T],
        shown_default: str,
        meaning: str,
        readers: tuple[Reader, ...],
        *,
        internal: bool = False,
        empty_is_unset: bool = True,
    ) -> None:
        if not name.startswith("STRATO_"):
            raise ValueError(f"{name}: settings are named STRATO_*")
        self.name = name
        self.kind = kind
        self._parse = parse
        self._default = default
        self.shown_default = shown_default
        self.meaning = meaning
        self.readers = readers
        self.expected = expected
        self.internal = internal
        self.empty_is_unset = empty_is_unset

    def __repr__(self) -> str:
        return f"<setting {self.name} ({self.kind})>"

    @property
    def default(self) -> T:
        return self._default()

    def raw(self, env: Env | None = None) -> str | None:
        """The variable's text, or ``None`` where it is unset (or empty, if that means
        unset for this variable)."""
        text = (os.environ if env is None else env).get(self.name)
        if text is None or (self.empty_is_unset and not text.strip()):
            return None
        return text

    def is_set(self, env: Env | None = None) -> bool:
        return self.raw(env) is not None

    def get(self, env: Env | None = None) -> T:
        """The typed value: parsed from the environment (``os.environ`` unless ``env`` is
        given), else the default."""
        text = self.raw(env)
        if text is None:
            return self._default()
        return self.parse(text)

    def required(self, env: Env | None = None) -> T:
        """The value, which must be set: strato sets it for the process that reads it."""
        text = self.raw(env)
        if text is None:
            raise SettingError(self.name, "", f"{self.expected} (it is unset: {self.meaning})")
        return self.parse(text)

    def parse(self, text: str) -> T:
        """``text`` as this setting's value; a :class:`SettingError` names the variable."""
        try:
            return self._parse(text)
        except (ValueError, OverflowError):
            raise SettingError(self.name, text, self.expected) from None


REGISTRY: dict[str, Setting] = {}


def _declare(setting: Setting[T]) -> Setting[T]:
    if setting.name in REGISTRY:
        raise ValueError(f"{setting.name} is declared twice")
    REGISTRY[setting.name] = setting
    return setting


def _const(value: T) -> Callable[[], T]:
    return lambda: value


def _size(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{int(n // size)} {unit}"
    return f"{n:g} bytes"


def _duration(s: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)} {unit}"
    return f"{s:g} s"


class Range:
    """The values a number may take: from ``lo`` (excluded where ``lo_open``) to ``hi``."""

    __slots__ = ("lo", "hi", "lo_open")

    def __init__(self, lo: float | None = 0, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def __str__(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f" above {lo:g}, at most {hi:g}" if self.lo_open else f" from {lo:g} to {hi:g}"
        if lo is not None:
            return f" above {lo:g}" if self.lo_open else f" of {lo:g} or more"
        return f" of at most {hi:g}" if hi is not None else ""

    def check(self, text: str, whole: bool) -> float:
        value = float(text.strip())  # ValueError where it is no number
        if not math.isfinite(value) or (whole and not value.is_integer()):
            raise ValueError(text)
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise ValueError(text)
        if self.hi is not None and value > self.hi:
            raise ValueError(text)
        return value


POSITIVE = Range(0, lo_open=True)
_NOUNS = {"bytes": "number of bytes", "MiB": "number of MiB", "seconds": "number of seconds"}
_NOUNS |= {"ms": "number of milliseconds", "share": "share"}


def _whole(unit: str, within: Range) -> tuple[str, Callable[[str], int], str]:
    """(kind, parser, what it expects) of a whole number (``1e6`` is one; ``1.5`` is not)."""
    expected = f"a whole {_NOUNS.get(unit, 'number')}{within}"
    return ("bytes" if unit == "bytes" else "int"), lambda t: int(within.check(t, True)), expected


def _real(unit: str, within: Range) -> tuple[str, Callable[[str], float], str]:
    """(kind, parser, what it expects) of a finite number."""
    kind = unit if unit in ("seconds", "ms") else "float"
    return kind, lambda t: within.check(t, False), f"a {_NOUNS.get(unit, 'number')}{within}"


IntUnit = Literal["bytes", "count", "MiB", "id", "pid", "port"]
RealUnit = Literal["seconds", "ms", "share", "number"]


def integer(
    name: str,
    default: int,
    meaning: str,
    readers: tuple[Reader, ...],
    *,
    unit: IntUnit = "count",
    within: Range = Range(0),
    shown_default: str | None = None,
) -> Setting[int]:
    """A whole number, 0 or more unless ``within`` says otherwise."""
    shown = shown_default or (_size(default) if unit == "bytes" else str(default))
    return _declare(Setting(name, *_whole(unit, within), _const(default), shown, meaning, readers))


def optional_integer(
    name: str, shown_default: str, meaning: str, readers: tuple[Reader, ...], **how: Any
) -> Setting[int | None]:
    """A whole number whose default its reader computes (``shown_default`` says how):
    ``get`` returns ``None`` where the variable is unset. ``how``: ``unit``, ``within``
    as for :func:`integer`, and ``internal``."""
    kind = _whole(how.get("unit", "count"), how.get("within", Range(0)))
    internal = how.get("internal", False)
    return _declare(
        Setting[int | None](
            name, *kind, _const(None), shown_default, meaning, readers, internal=internal
        )
    )


def number(
    name: str,
    default: float,
    meaning: str,
    readers: tuple[Reader, ...],
    *,
    unit: RealUnit = "seconds",
    within: Range = POSITIVE,
) -> Setting[float]:
    """A finite number: seconds above 0 unless ``unit`` and ``within`` say otherwise."""
    shown = _duration(default) if unit == "seconds" else f"{default:g}"
    return _declare(Setting(name, *_real(unit, within), _const(default), shown, meaning, readers))


def optional_number(
    name: str, shown_default: str, meaning: str, readers: tuple[Reader, ...]
) -> Setting[float | None]:
    """A number above 0 whose default its reader computes (``None`` where unset)."""
    kind = _real("number", POSITIVE)
    return _declare(
        Setting[float | None](name, *kind, _const(None), shown_default, meaning, readers)
    )


def _parse_flag(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def flag(
    name: str, default: bool, meaning: str, readers: tuple[Reader, ...], *, internal: bool = False
) -> Setting[bool]:
    """On or off: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    expected = "1, true, yes, on, 0, false, no or off"
    shown = "1" if default else "0"
    how = ("bool", _parse_flag, expected, _const(default), shown, meaning, readers)
    return _declare(Setting(name, *how, internal=internal))


def text(
    name: str,
    default: str,
    meaning: str,
    readers: tuple[Reader, ...],
    *,
    shown_default: str | None = None,
    choices: tuple[str, ...] = (),
    upper: bool = False,
    internal: bool = False,
    empty_is_unset: bool = True,
    kind: str = "str",
) -> Setting[str]:
    """Text, kept as given (``upper``: upper-cased; ``choices``: one of them). An empty
    ``default`` means that the reader computes it; ``shown_default`` says how."""

    def parse(value: str) -> str:
        value = value.strip().upper() if upper else value
        if choices and value not in choices:
            raise ValueError(value)
        return value

    expected = f"one of {', '.join(choices)}" if choices else "text"
    shown = shown_default if shown_default is not None else (default or "-")
    setting = Setting(name, kind, parse, expected, _const(default), shown, meaning, readers)
    setting.internal, setting.empty_is_unset = internal, empty_is_unset
    return _declare(setting)


def path(
    name: str, shown_default: str, meaning: str, readers: tuple[Reader, ...]
) -> Setting[Path | None]:
    """A filesystem path (``~`` expanded) whose default its reader decides (``None`` where
    unset; ``shown_default`` says what it is)."""
    how = ("path", _parse_path, "a filesystem path", _const(None), shown_default)
    setting: Setting[Path | None] = Setting(name, *how, meaning, readers)
    return _declare(setting)


def _parse_names(value: str) -> tuple[str, ...]:
    names = tuple(n for n in value.replace(",", " ").split() if n)
    for n in names:
        if not all(part.isidentifier() for part in n.split(".")):
            raise ValueError(value)
    return names


def _parse_backoff(value: str) -> tuple[float, float]:
    first, cap = (float(x) for x in value.split(","))  # ValueError unless two numbers
    if not (0 < first <= cap < 86400):
        raise ValueError(value)
    return first, cap


def _parse_paths(value: str) -> tuple[str, ...]:
    return tuple(p for p in value.split(os.pathsep) if p)


def _parse_path(value: str) -> Path:
    from pathlib import Path

    if "\0" in value:
        raise ValueError(value)
    return Path(value).expanduser()


def _default_home() -> Path:
    from pathlib import Path

    return Path.home() / ".strato"


# ======================================================================================
# Where things are

HOME = _declare(
    Setting(
        "STRATO_HOME",
        kind="path",
        parse=_parse_path,
        default=_default_home,
        shown_default="`~/.strato`",
        meaning="The folder of this machine's strato state: the embedded control plane's "
        "database, blobs, tokens, logs, and the worker's caches and built images. Private "
        "to its user.",
        readers=(CLIENT, SERVER, WORKER),
        expected="a filesystem path",
    )
)
SERVER_URL = text(
    "STRATO_SERVER_URL",
    "http://127.0.0.1:7749",
    "Where clients find the control plane. Where nothing answers at a loopback URL, "
    "`strato run` starts the embedded one there.",
    (CLIENT,),
    kind="url",
)
CLIENT_HTTP = flag(
    "STRATO_CLIENT_HTTP",
    False,
    "Send API requests over HTTP even where the control plane is on this machine (by "
    "default a client there uses its channel socket, which answers with less overhead).",
    (CLIENT,),
)
TOKEN = text(
    "STRATO_TOKEN",
    "",
    "The API token. The control plane accepts it, clients and worker agents send it.",
    (CLIENT, SERVER, WORKER),
    shown_default="`$STRATO_HOME/token`, made on the control plane's first start",
)


def _workspace_name(value: str) -> str:
    if not (len(value) <= 48 and value.replace("-", "").isalnum() and value.islower()):
        raise ValueError(value)
    return value


WORKSPACE = _declare(
    Setting(
        "STRATO_WORKSPACE",
        "str",
        _workspace_name,
        "a workspace name: at most 48 lowercase letters, digits and '-'",
        _const(""),
        "the token's workspace",
        "The workspace to act in. The installation's token may act in any workspace (default "
        "`main`); a workspace token only in its own (another is refused).",
        (CLIENT,),
    )
)
LOG_LEVEL = text(
    "STRATO_LOG_LEVEL",
    "INFO",
    "How much the control plane and the worker agent log.",
    (SERVER, WORKER),
    choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    upper=True,
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

# ======================================================================================
# A worker agent and its node

NODE_NAME = text(
    "STRATO_NODE_NAME",
    "",
    "The name this node registers with.",
    (WORKER,),
    shown_default="the host name",
)
NODE_CPU = optional_number(
    "STRATO_NODE_CPU",
    "the CPUs this process may use",
    "CPU cores this node offers to containers (for instance `3.5`).",
    (WORKER,),
)
NODE_MEMORY_MB = optional_integer(
    "STRATO_NODE_MEMORY_MB",
    "the machine's memory",
    "Memory this node offers to containers.",
    (WORKER,),
    unit="MiB",
    within=Range(1),
)
NODE_GPUS = text(
    "STRATO_NODE_GPUS",
    "",
    'GPUs this node offers, as `TYPE:COUNT,...` (`"H100:2,A100-80GB:1"`); empty: none.',
    (WORKER,),
    shown_default="what `nvidia-smi` lists",
    empty_is_unset=False,
    kind="gpus",
)
NODE_REGION = text(
    "STRATO_NODE_REGION", "", "The region this node is in, for `region=` placement.", (WORKER,)
)
NODE_PRICE_PER_HOUR = number(
    "STRATO_NODE_PRICE_PER_HOUR",
    0.0,
    "What an hour of this node costs, for placement and metering.",
    (WORKER,),
    unit="number",
    within=Range(0.0),
)
NODE_LABELS = text(
    "STRATO_NODE_LABELS",
    "",
    'Labels of this node, as `key=value,...` (`"zone=a,tier=spot"`).',
    (WORKER,),
    kind="labels",
)
NODE_PROVIDER = text(
    "STRATO_NODE_PROVIDER",
    "local",
    "The provider that started this worker agent.",
    (WORKER,),
    internal=True,
)
WORKER_CHANNEL = text(
    "STRATO_WORKER_CHANNEL",
    "",
    "The control plane's channel address a worker agent dials.",
    (WORKER,),
    shown_default="`unix:$STRATO_HOME/run/channel.sock`",
    internal=True,
)
WORKER_PARENT_PID = optional_integer(
    "STRATO_WORKER_PARENT_PID",
    "-",
    "The control plane's pid; the local worker agent exits when it is gone.",
    (WORKER,),
    unit="pid",
    internal=True,
    within=Range(1),
)
WORKER_HEARTBEAT_S = number(
    "STRATO_WORKER_HEARTBEAT_S",
    5.0,
    "How often a worker agent sends its heartbeat.",
    (WORKER,),
    within=Range(0.0, 86400.0, lo_open=True),
)
LOG_QUOTA = integer(
    "STRATO_LOG_QUOTA",
    16 << 20,
    "Bytes of log lines a container may write per minute; more are dropped and said so "
    "(0: no limit).",
    (WORKER,),
    unit="bytes",
)
IMAGE_CACHE = path(
    "STRATO_IMAGE_CACHE",
    "`$STRATO_HOME/images`",
    "The image build cache of this machine, shared by its worker agents.",
    (WORKER, CLIENT),
)
DEBIAN_MIRROR = text(
    "STRATO_DEBIAN_MIRROR",
    "",
    "The Debian mirror `Image.debian_slim()` builds from.",
    (WORKER,),
    shown_default="the host's apt mirror, else `http://deb.debian.org/debian`",
    kind="url",
)

# -- runtimes
CONTAINER_UID = integer(
    "STRATO_CONTAINER_UID",
    65534,
    "The unprivileged user containers run as, the same inside and on the host.",
    (WORKER,),
    unit="id",
    within=POSITIVE,
)
CONTAINER_GID = integer(
    "STRATO_CONTAINER_GID",
    65534,
    "The unprivileged group containers run as.",
    (WORKER,),
    unit="id",
    within=POSITIVE,
)
CONTAINER_PIDS_MAX = integer(
    "STRATO_CONTAINER_PIDS_MAX",
    4096,
    "Processes and threads one container may have.",
    (WORKER,),
    within=Range(1),
)
RUNTIME_DIR = path(
    "STRATO_RUNTIME_DIR",
    "`/var/lib/strato/runtime` for root, else `<tmp>/strato-runtime-<uid>`",
    "The isolating runtimes' state: containers' root filesystems and writable layers. "
    "Its filesystem must hold an overlayfs upper layer (not overlayfs itself).",
    (WORKER,),
)
GVISOR_PLATFORM = text(
    "STRATO_GVISOR_PLATFORM",
    "ptrace",
    "The gVisor platform `runsc` uses (`kvm` needs working nested virtualisation).",
    (WORKER,),
)
EGRESS_POOL = integer(
    "STRATO_EGRESS_POOL",
    2,
    "Network namespaces with egress made ahead of container starts (0: each made when asked for).",
    (WORKER,),
)

# -- cold starts: zygotes, memory-snapshot templates, CRIU
ZYGOTE = flag(
    "STRATO_ZYGOTE",
    True,
    "Whether containers are forked from warm zygotes and memory-snapshot templates.",
    (WORKER,),
)
PREIMPORT = _declare(
    Setting(
        "STRATO_PREIMPORT",
        kind="modules",
        parse=_parse_names,
        default=_const(()),
        shown_default="-",
        meaning="Modules a zygote imports before it forks containers, comma-separated; "
        'an image may add its own (`Image.env({"STRATO_PREIMPORT": "torch,numpy"})`).',
        readers=(WORKER, CONTAINER),
        expected="module names, comma-separated",
    )
)
ZYGOTE_NETNS_AHEAD = integer(
    "STRATO_ZYGOTE_NETNS_AHEAD",
    2,
    "User and network namespaces the worker makes ahead for forked containers.",
    (WORKER,),
)
SNAPSHOT_TTL = number(
    "STRATO_SNAPSHOT_TTL",
    900.0,
    "An idle memory-snapshot template is dropped after this long.",
    (WORKER,),
)
SNAPSHOT_MAX = integer(
    "STRATO_SNAPSHOT_MAX",
    8,
    "Idle memory-snapshot templates a worker keeps.",
    (WORKER,),
)
SNAPSHOT_KEEP = number(
    "STRATO_SNAPSHOT_KEEP",
    7 * 86400.0,
    "Checkpoints on disk unused for this long are deleted.",
    (WORKER,),
)
CRIU = path(
    "STRATO_CRIU",
    "`criu` on the PATH",
    "The CRIU binary memory snapshots are checkpointed with.",
    (WORKER,),
)

# ======================================================================================
# Set by strato for a container (read inside it)

CONTAINER_ID = text("STRATO_CONTAINER_ID", "", "This container's id.", (CONTAINER,), internal=True)
CHANNEL = text(
    "STRATO_CHANNEL",
    "",
    "The address of the channel to the control plane (`unix:<path>`).",
    (CONTAINER,),
    internal=True,
)
CONTAINER_TOKEN = text(
    "STRATO_CONTAINER_TOKEN",
    "",
    "The credential of this container on its channel, scoped to it (empty in a "
    "memory-snapshot template, which has no channel of its own).",
    (CONTAINER,),
    internal=True,
    empty_is_unset=False,
)
CONTAINER_SPEC = text(
    "STRATO_CONTAINER_SPEC",
    "",
    "The file holding the function spec this container runs.",
    (CONTAINER,),
    internal=True,
    kind="path",
)
MOUNT_PATHS = _declare(
    Setting(
        "STRATO_MOUNT_PATHS",
        kind="paths",
        parse=_parse_paths,
        default=_const(()),
        shown_default="-",
        meaning="Folders of the app's code, put on `sys.path`, separated by `:`.",
        readers=(CONTAINER,),
        expected="paths separated by ':'",
        internal=True,
    )
)
# --- ops: begin (metrics and dashboard)
METRICS_OPEN_LOOPBACK = flag(
    "STRATO_METRICS_OPEN_LOOPBACK",
    False,
    "Serve `GET /metrics` without the API token to clients on loopback (a Prometheus on "
    "the same host); from anywhere else it still needs the token.",
    (SERVER,),
)
METRICS_MAX_FUNCTIONS = integer(
    "STRATO_METRICS_MAX_FUNCTIONS",
    500,
    "Functions (app and function name pairs) that get their own labels in `/metrics`; "
    'the rest are counted under app="other", function="other".',
    (SERVER,),
    within=Range(1),
)
# --- ops: end
FUNCTION_ID = text(
    "STRATO_FUNCTION_ID",
    "",
    "The id of the function this container runs (for the user's code).",
    (CONTAINER,),
    internal=True,
)
APP_ID = text(
    "STRATO_APP_ID",
    "",
    "The id of the app this container belongs to (for the user's code).",
    (CONTAINER,),
    internal=True,
)
IN_CONTAINER = flag(
    "STRATO_IN_CONTAINER",
    False,
    "Set in a container once strato's entrypoint runs: `Image.imports()` imports for real "
    "and `app.run()` is refused.",
    (CONTAINER,),
    internal=True,
)
ZYGOTE_FD = optional_integer(
    "STRATO_ZYGOTE_FD",
    "-",
    "A zygote's control socket (a file descriptor).",
    (CONTAINER,),
    internal=True,
)


def _parse_zygote_mode(value: str) -> ZygoteMode:
    if value == "zygote":
        return "zygote"
    if value == "template":
        return "template"
    raise ValueError(value)


ZYGOTE_MODE = _declare(
    Setting[ZygoteMode](
        "STRATO_ZYGOTE_MODE",
        kind="zygote|template",
        parse=_parse_zygote_mode,
        default=_const("zygote"),
        shown_default="zygote",
        meaning="What a zygote process is: a plain `zygote`, or a memory-snapshot `template` "
        "that imported a function and ran its `@enter(snap=True)` hooks.",
        readers=(CONTAINER,),
        expected="zygote or template",
        internal=True,
    )
)


# ======================================================================================
# The docs' table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """``docs/settings.md``: a table of every setting, generated from the declarations."""
    head = [
        "# Settings",
        "",
        "<!-- generated by `python -m strato.settings --markdown`"
        " from src/strato/settings.py; do not edit -->",
        "",
        "strato reads its settings from `STRATO_*` environment variables. An unset or empty",
        "variable takes its default; a value strato cannot use stops the process that reads",
        "it with an error naming the variable. *Read by* says which processes read it:",
        "`client` (the SDK and the CLI), `server` (the control plane), `worker` (a worker",
        "agent) or `container` (strato's entrypoint in a container).",
        "",
    ]
    out = list(head)
    for title, internal in (("You may set", False), ("Set by strato for its own processes", True)):
        out += [f"## {title}", "", "| variable | type | default | read by | meaning |"]
        out.append("|---|---|---|---|---|")
        for s in REGISTRY.values():
            if s.internal != internal:
                continue
            readers = ", ".join(s.readers)
            default = s.shown_default
            if default not in ("-",) and not default.startswith("`") and " " not in default:
                default = f"`{default}`"
            out.append(
                f"| `{s.name}` | {s.kind} | {_cell(default)} | {readers} | {_cell(s.meaning)} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if args == ["--check"]:
        bad = []
        for s in REGISTRY.values():
            try:
                s.get()
            except SettingError as e:
                bad.append(str(e))
        print("\n".join(bad) or "every STRATO_* variable set here is valid")
        return 1 if bad else 0
    print("usage: python -m strato.settings --markdown | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
