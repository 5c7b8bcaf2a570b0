"""``strato.Dict``: a durable, distributed dictionary kept by the control plane
(Modal's ``modal.Dict``).

Keys and values are any object cloudpickle can pickle; two keys are the same key when
they pickle to the same bytes. Entries expire after 7 days without being read or written
(``STRATO_DICT_TTL``). Every method has an ``.aio`` twin (``await d.get.aio(k)``,
``async for k in d.keys.aio()``). A Dict from ``from_name`` is looked up on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

import cloudpickle

from strato import exceptions as exc
from strato.client import session
from strato.client.api_base import ApiBase
from strato.client.serialization import deserialize
from strato.protocol import messages as m

from .aio import with_aio

__all__ = ["Dict"]

KEY_PROTOCOL = 4  # keys pickle the same in every Python version that may share a Dict
PAGE = 1000  # entries per page of keys()/values()/items()
REQUEST_BYTES = 8 << 20  # update() sends its entries in requests of about this size
HEARTBEAT_S = 30.0  # an ephemeral object's heartbeat (the control plane allows 300 s)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_MISSING = object()
S = TypeVar("S", bound="StateObject")
T = TypeVar("T")


def check_name(kind: str, name: object) -> str:
    """Modal's rule for names of Dicts and Queues: 1 to 64 letters, digits, '.', '-', '_'."""
    if not isinstance(name, str):
        raise exc.InvalidError(f"a {kind} name must be a str, not {type(name).__name__}")
    if not name or len(name) > m.STATE_NAME_MAX or not _NAME.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise exc.InvalidError(
            f"invalid {kind} name {shown!r}: use 1 to {m.STATE_NAME_MAX} characters, each a "
            "letter, digit, '.', '-' or '_'"
        )
    return name


_ATOMS = frozenset((str, bytes, int, float, bool, type(None)))
_PLAIN_MAX = 64  # items of one container checked for the fast path (else: cloudpickle)


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is built of atoms, tuples, lists and dicts only (small ones): plain
    ``pickle`` writes the same bytes for it as cloudpickle, several times faster."""
    t = type(value)
    if t in _ATOMS:
        return True
    if depth >= 4 or (t is not dict and t is not list and t is not tuple):
        return False
    if len(value) > _PLAIN_MAX:
        return False
    if t is dict:
        for k in value:
            if type(k) not in _ATOMS:
                return False
        value = value.values()
    for v in value:
        if type(v) not in _ATOMS and not _plain(v, depth + 1):
            return False
    return True


def dumps(value: object, what: str, protocol: int | None = None) -> bytes:
    if _plain(value):  # the same bytes as cloudpickle's (a Dict key must pickle the same)
        return pickle.dumps(value, cloudpickle.DEFAULT_PROTOCOL if protocol is None else protocol)
    try:
        return cloudpickle.dumps(value, protocol=protocol)
    except Exception as e:  # noqa: BLE001 - any failure to pickle is the value's
        r = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise exc.SerializationError(
            f"cannot store {what} {r}: a {type(value).__qualname__} object cannot be pickled "
            f"({e}); store plain data instead"
        ) from None


def limits(client: ApiBase) -> dict:
    """The control plane's payload limits (its /health, once per client)."""
    if client.health is None:
        client.health = json.loads(client.request_raw("GET", "/health"))
    return client.health


class _StaticAio:
    """A class-level function (``Dict.delete``) with an ``.aio`` twin."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: object, owner: type | None = None) -> _BoundStatic:
        return _BoundStatic(self._fn, owner)


class _BoundStatic:
    def __init__(self, fn: Callable[..., Any], owner: type | None) -> None:
        self._fn, self._owner = fn, owner
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._owner, *args, **kwargs)

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        return asyncio.to_thread(self._fn, self._owner, *args, **kwargs)


class _Ephemeral(Generic[S]):
    """``with Dict.ephemeral() as d:`` (or ``async with``): made on entry, deleted at exit;
    kept alive by a heartbeat meanwhile (the control plane deletes it if this process
    dies)."""

    def __init__(self, cls: type[S], setup: Callable[[S], None] | None) -> None:
        self._cls = cls
        self._setup = setup
        self._obj: S | None = None
        self._stop = threading.Event()

    def __enter__(self) -> S:
        client = session.api()
        ref = client.call("POST", f"{self._cls._base}/ephemeral", None, m.StateRef)
        obj = self._cls._hydrated(ref.object_id, None)
        self._obj = obj
        threading.Thread(
            target=self._beat, args=(client, ref.object_id), name="strato-ephemeral", daemon=True
        ).start()
        try:
            if self._setup is not None:
                self._setup(obj)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return obj

    def _beat(self, client: ApiBase, object_id: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                client.call("POST", f"{self._cls._base}/{object_id}/heartbeat")
            except exc.NotFoundError:
                return
            except exc.Error:
                continue  # the control plane is restarting: the next beat tries again

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._obj is not None and self._obj._object_id is not None:
            session.api().call("DELETE", f"{self._cls._base}/{self._obj._object_id}")

    async def __aenter__(self) -> S:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *args: object) -> None:
        await asyncio.to_thread(self.__exit__, *args)


class StateObject:
    """What Dict and Queue share: made by name (looked up on first use), ephemeral, or
    deleted by name."""

    _kind: ClassVar[str] = ""
    _base: ClassVar[str] = ""

    def __init__(self) -> None:
        raise exc.InvalidError(
            f"make a {self._kind} with {self._kind}.from_name(name, create_if_missing=True) "
            f"or `with {self._kind}.ephemeral() as x:`"
        )

    @classmethod
    def _new(cls: type[S], name: str | None, create: bool) -> S:
        obj = object.__new__(cls)
        obj._name = name
        obj._create = create
        obj._object_id = None
        obj._hyd_lock = threading.Lock()
        return obj

    @classmethod
    def _hydrated(cls: type[S], object_id: str, name: str | None) -> S:
        obj = cls._new(name, False)
        obj._object_id = object_id
        return obj

    @classmethod
    def from_name(
        cls: type[S],
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
    ) -> S:
        """The named object; made on first use when ``create_if_missing`` (else that use
        raises `NotFoundError` if there is none). ``environment_name`` is accepted for
        Modal's signature; strato has one environment."""
        return cls._new(check_name(cls._kind, name), create_if_missing)

    @classmethod
    def lookup(
        cls: type[S],
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
    ) -> S:
        """``from_name`` looked up at once (Modal's older spelling)."""
        return cls.from_name(name, create_if_missing=create_if_missing).hydrate()

    @_StaticAio
    def delete(cls, name: str, *, environment_name: str | None = None) -> None:  # noqa: N805
        """Delete the named object and everything in it."""
        body = m.StateLookup(check_name(cls._kind, name))
        session.api().call("POST", f"{cls._base}/delete", body)

    def hydrate(self: S) -> S:
        """Look the object up now (``from_name`` does it on first use)."""
        self._id()
        return self

    @property
    def object_id(self) -> str:
        return self._id()

    @property
    def name(self) -> str | None:
        return self._name

    def _id(self) -> str:
        if self._object_id is None:
            with self._hyd_lock:
                if self._object_id is None:
                    assert self._name is not None
                    ref = session.api().call(
                        "POST",
                        f"{self._base}/lookup",
                        m.StateLookup(self._name, self._create),
                        m.StateRef,
                    )
                    self._object_id = ref.object_id
        return self._object_id

    def _path(self, op: str) -> str:
        return f"{self._base}/{self._id()}/{op}"

    def __reduce__(self) -> tuple:
        # passed to a function (``f.remote(q)``): the same object on the other side
        if self._object_id is not None:
            return (_restore, (type(self), self._object_id, self._name, False))
        return (_restore, (type(self), None, self._name, self._create))

    def __repr__(self) -> str:
        what = repr(self._name) if self._name else "ephemeral"
        return f"strato.{self._kind}({what}, id={self._object_id})"

    # set by _new
    _name: str | None
    _create: bool
    _object_id: str | None
    _hyd_lock: threading.Lock


def _restore(cls: type[S], object_id: str | None, name: str | None, create: bool) -> S:
    if object_id is not None:
        return cls._hydrated(object_id, name)
    return cls._new(name, create)


class Dict(StateObject):
    """A durable dictionary: ``d[k] = v``, ``d.get(k)``, ``d.put(k, v, skip_if_exists=)``,
    ``d.pop(k)``, ``k in d``, ``d.len()``, ``d.keys()/values()/items()``, ``d.clear()``."""

    _kind = "Dict"
    _base = "/dicts"

    @classmethod
    def ephemeral(cls, data: dict | None = None) -> _Ephemeral[Dict]:
        """A Dict that lives for a ``with`` block (or ``async with``); ``data`` fills it."""
        return _Ephemeral(cls, (lambda d: d.update(data)) if data else None)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _key(key: object) -> bytes:
        return dumps(key, "the Dict key", KEY_PROTOCOL)

    def _entry(self, client: ApiBase, key: object, value: object) -> m.DictEntry:
        k = self._key(key)
        data = dumps(value, f"the value of Dict key {key!r:.60} as", None)
        health = limits(client)
        if len(data) > health["max_payload_bytes"]:
            raise exc.RequestSizeError(
                f"the value of Dict key {key!r:.60} pickles to {len(data)} bytes, over the "
                f"control plane's limit of {health['max_payload_bytes']} bytes "
                "(STRATO_MAX_PAYLOAD): keep large data in a Volume"
            )
        if len(data) > health["blob_threshold_bytes"]:
            blob = hashlib.sha256(data).hexdigest()
            client.put_blob(blob, data)
            return m.DictEntry(k, None, blob)
        return m.DictEntry(k, data)

    @staticmethod
    def _value(client: ApiBase, data: bytes | None, blob: str | None) -> Any:
        if blob is not None:
            data = client.get_blob(blob)
        assert data is not None
        return deserialize(data, "a Dict value")

    def _put(self, entries: list[m.DictEntry], skip_if_exists: bool = False) -> int:
        """Send the entries in requests of at most ``DICT_MAX_BATCH`` entries and about
        ``REQUEST_BYTES`` (large values are in the blob store already)."""
        client = session.api()
        stored = 0
        batch: list[m.DictEntry] = []
        size = 0
        for entry in [*entries, None]:
            if entry is not None:
                batch.append(entry)
                size += len(entry.key) + len(entry.value or b"")
            if batch and (entry is None or len(batch) >= m.DICT_MAX_BATCH or size >= REQUEST_BYTES):
                body = m.DictPut(batch, skip_if_exists)
                stored += client.call("POST", self._path("put"), body, m.StateCount).n
                batch, size = [], 0
        return stored

    # ------------------------------------------------------------------ reading

    @with_aio
    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when there is none."""
        client = session.api()
        got = client.call("POST", self._path("get"), m.DictKey(self._key(key)), m.DictValue)
        if not got.found:
            return default
        return self._value(client, got.value, got.blob)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    @with_aio
    def contains(self, key: Any) -> bool:
        """Whether ``key`` has a value."""
        body = m.DictKey(self._key(key))
        return session.api().call("POST", self._path("contains"), body, m.DictValue).found

    def __contains__(self, key: Any) -> bool:
        return self.contains(key)

    @with_aio
    def len(self) -> int:
        """How many entries the Dict has."""
        return session.api().call("GET", self._path("len"), None, m.StateCount).n

    def _pages(self, what: str) -> Iterator[m.DictEntry]:
        client = session.api()
        after = 0
        while True:
            page = client.call(
                "GET",
                self._path("entries"),
                None,
                m.DictPage,
                params={"after": after, "limit": PAGE, "what": what},
            )
            yield from page.entries
            if page.done:
                return
            after = page.cursor

    @with_aio
    def keys(self) -> Iterator[Any]:
        """Every key, a page at a time (in the order keys were first stored)."""
        for e in self._pages("keys"):
            yield pickle.loads(e.key)

    @with_aio
    def values(self) -> Iterator[Any]:
        """Every value, a page at a time."""
        client = session.api()
        for e in self._pages("values"):
            yield self._value(client, e.value, e.blob)

    @with_aio
    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value), a page at a time."""
        client = session.api()
        for e in self._pages("items"):
            yield pickle.loads(e.key), self._value(client, e.value, e.blob)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    # ------------------------------------------------------------------ writing

    @with_aio
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Store ``value`` under ``key``; with ``skip_if_exists``, only when ``key`` has
        no value yet. Returns whether it stored the value."""
        return self._put([self._entry(session.api(), key, value)], skip_if_exists) == 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    @with_aio
    def update(self, other: Any = None, /, **kwargs: Any) -> None:
        """Store every entry of ``other`` (a mapping or pairs) and of ``kwargs``."""
        client = session.api()
        pairs = list(dict(other or (), **kwargs).items())
        self._put([self._entry(client, k, v) for k, v in pairs])

    @with_aio
    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (``default``, or `KeyError`, if none)."""
        client = session.api()
        got = client.call("POST", self._path("pop"), m.DictKey(self._key(key)), m.DictValue)
        if not got.found:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._value(client, got.value, got.blob)

    def __delitem__(self, key: Any) -> None:
        self.pop(key)

    @with_aio
    def clear(self) -> None:
        """Remove every entry."""
        session.api().call("POST", self._path("clear"))

    @with_aio
    def info(self) -> dict[str, Any]:
        """The Dict's name and id."""
        return {"name": self._name, "object_id": self._id()}
