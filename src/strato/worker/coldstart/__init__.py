"""Cold starts on the worker: zygotes, memory-snapshot templates, and CRIU.

A *zygote* is a process that has imported strato's container runtime, its SDK (what app
modules import) and the declared imports (``$STRATO_PREIMPORT`` of the worker, and of an
image: ``Image.env({"STRATO_PREIMPORT": "torch,numpy"})``; comma-separated module names),
kept warm: one per (runtime, Python, channel) for containers without an image, started
with the worker; one per (image, app code) for an image's containers, because it runs the
image's files and so may see only the code its containers see. A container is then forked
from it instead of starting a new interpreter. A *template*
(:mod:`~strato.worker.coldstart.templates`) is the same for one function with
``enable_memory_snapshot=True``: it also ran the function's ``@enter(snap=True)`` hooks. An
idle one is dropped after ``$STRATO_SNAPSHOT_TTL`` seconds (default 900), and at most
``$STRATO_SNAPSHOT_MAX`` (default 8) idle ones are kept. Templates are checkpointed to
disk with CRIU where it is usable (:mod:`~strato.worker.coldstart.criu`); where it is not,
the in-memory template alone serves, and the function's logs say why, once.

Everything that depends on the runtime is behind its :class:`strato.runtime.forking.
Forking` (``Runtime.forking``; ``None``: its containers always start normally): how a
zygote is started and sandboxed, how each forked container is (its environment, namespaces,
user, seccomp filter, binds, network), and what is made ahead. The worker and the zygote
speak :mod:`strato.protocol.zygote`; the zygote's side is :mod:`strato.container.zygote`.

- :mod:`~strato.worker.coldstart.pool`: :class:`ZygotePool`, the agent's entry point;
- :mod:`~strato.worker.coldstart.zygotes`: a zygote's process and its stop;
- :mod:`~strato.worker.coldstart.forked`: forking one container, :class:`ForkedContainer`;
- :mod:`~strato.worker.coldstart.channel`: the typed ``SOCK_SEQPACKET`` channel.

Not forked (they start normally): runtimes without ``forking`` (``gvisor``), containers
with GPUs, and whatever fails along the way. A fork whose set-up fails turns forking off
for ``BROKEN_RETRY_S`` for that runtime and image only (:meth:`ZygotePool.fallback_key`),
never for the worker; why is said once in the worker's log and once per function in the
app's logs. ``$STRATO_ZYGOTE=0`` turns forking off.
"""

from .criu import criu_check, criu_dump_argv, criu_restore_argv
from .forked import ForkedContainer
from .pool import ZygotePool
from .zygotes import ForkFailed

__all__ = [
    "ForkFailed",
    "ForkedContainer",
    "ZygotePool",
    "criu_check",
    "criu_dump_argv",
    "criu_restore_argv",
]
