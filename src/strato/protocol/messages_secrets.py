"""Wire types of secrets and schedules: a function's secrets by name or id, its schedule
(``Cron``/``Period``), and the API's bodies for both. Re-exported by
``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from .messages_base import Count, Timestamp

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
