"""Wire types of Dict and Queue (``strato.Dict``, ``strato.Queue``): lookups, entries,
puts, gets and their limits. Re-exported by ``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from .messages_base import MAX_INT, Count, Seconds

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
