"""Names and ids of Dicts and Queues, checked with messages that say what is allowed."""

from __future__ import annotations

import re
import secrets

from strato import exceptions as exc
from strato.protocol import messages as m

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_ID = {"Dict": re.compile(r"^di-[0-9a-f]{24}$"), "Queue": re.compile(r"^qu-[0-9a-f]{24}$")}
_PREFIX = {"Dict": "di-", "Queue": "qu-"}


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid name of a Dict or Queue (Modal's rule: 1 to 64 letters,
    digits, ``.``, ``-`` and ``_``); `InvalidError` naming the rule else."""
    if not name or len(name) > m.STATE_NAME_MAX or not _NAME.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise exc.InvalidError(
            f"invalid {kind} name {shown!r}: use 1 to {m.STATE_NAME_MAX} characters, each a "
            "letter, digit, '.', '-' or '_'"
        )
    return name


def new_id(kind: str) -> str:
    return _PREFIX[kind] + secrets.token_hex(12)


def check_id(kind: str, object_id: str) -> str:
    if not _ID[kind].match(object_id):
        raise exc.NotFoundError(f"no {kind} with id {object_id[:80]!r}")
    return object_id


def check_partition(partition: str) -> str:
    """A partition key ("" is the default partition): 1 to 64 bytes of UTF-8."""
    try:
        size = len(partition.encode())
    except UnicodeEncodeError:
        raise exc.InvalidError(
            f"partition key {partition[:80]!r} is not valid Unicode text"
        ) from None
    if size > m.QUEUE_PARTITION_KEY_MAX_BYTES:
        raise exc.InvalidError(
            f"partition key {partition[:80]!r} is {size} bytes: a partition key must be 1 to "
            f"{m.QUEUE_PARTITION_KEY_MAX_BYTES} bytes"
        )
    return partition
