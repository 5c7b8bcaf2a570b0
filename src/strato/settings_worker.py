"""Settings of a worker agent and its node: its resources, runtimes, images and cold
starts (zygotes, memory-snapshot templates, CRIU). Re-exported by ``strato.settings``."""

from __future__ import annotations

from strato.settings_base import (
    CLIENT,
    CONTAINER,
    POSITIVE,
    WORKER,
    Range,
    Setting,
    _const,
    _declare,
    _parse_names,
    flag,
    integer,
    number,
    optional_integer,
    optional_number,
    path,
    text,
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
