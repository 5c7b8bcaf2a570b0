"""What every part of the wire types shares: the ranges each number that crosses the edge
is checked against, and ``ChannelMsg``, the base of the channel's tagged union
(``messages.ChannelMessage``). Re-exported by ``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

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


class ChannelMsg(msgspec.Struct, tag=True, tag_field="t"):
    pass
