"""The sandbox agent's frames without msgspec: a small msgpack codec (standard library
only) for exactly the messages the agent sends and receives, byte for byte what msgspec
makes of the same ``strato.protocol.messages`` structs (``tests/unit/test_sblite_wire.py``
checks every one against msgspec).

Under gVisor every module a sandbox's agent imports costs its start a few milliseconds of
system calls; msgspec with what it imports (datetime, decimal, uuid, its C extension) and
the message declarations took about 100 ms of it. The agent needs a dozen messages, so
it carries them itself.

The classes here mirror their namesakes in ``strato.protocol.messages`` (same tag, fields,
order and defaults; maps, except the ``array_like`` ones). A decoded frame has its fields'
types checked (a wrong type, a missing field, a truncated or malformed body raise
:class:`~strato.protocol.framing.FrameError`); the numeric ranges and patterns msgspec
would also check are the control plane's to keep: it encodes only what it validated.
A frame with a tag the agent does not handle decodes to :class:`Other`.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from strato.protocol.framing import LEN, FrameError

_NO_DEFAULT = object()
_MAX_DEPTH = 32  # nesting deeper than any message's is malformed (and no recursion error)


class Struct:
    """A message: ``FIELDS`` lists (name, kind, default) in the declaration's order; a kind
    is ``int``, ``float``, ``str``, ``bytes``, ``bool``, ``[str]``, ``{str:str}`` or a
    Struct class, with a trailing ``?`` (or a class in a 1-tuple) where None is allowed."""

    TAG: ClassVar[str | None] = None
    ARRAY_LIKE: ClassVar[bool] = False
    FIELDS: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self.FIELDS
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} fields")
        for i, (name, _, default) in enumerate(fields):
            if i < len(args):
                value = args[i]
            elif name in kwargs:
                value = kwargs.pop(name)
            elif default is _NO_DEFAULT:
                raise TypeError(f"{type(self).__name__} needs {name}")
            else:
                value = default.copy() if isinstance(default, (list, dict)) else default
            setattr(self, name, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kwargs))}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, f[0]) == getattr(other, f[0]) for f in self.FIELDS
        )

    def __repr__(self) -> str:
        inner = ", ".join(f"{f[0]}={getattr(self, f[0])!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({inner})"


R = _NO_DEFAULT  # a required field


# ---------------------------------------------------------------- what the agent sends


class ContainerHello(Struct):
    TAG = "hello"
    FIELDS = (("container_id", "str", R), ("token", "str", R))
    container_id: str
    token: str


class ContainerReady(Struct):
    TAG = "ready"


class SbChunk(Struct):
    ARRAY_LIKE = True
    FIELDS = (("pid", "int", R), ("stream", "int", R), ("data", "bytes", R), ("eof", "bool", False))
    pid: int
    stream: int
    data: bytes
    eof: bool


class SbOutput(Struct):
    TAG = "sbout"
    FIELDS = (("chunks", [SbChunk], R),)
    chunks: list[SbChunk]


class SbExit(Struct):
    TAG = "sbexit"
    FIELDS = (("pid", "int", R), ("returncode", "int", R), ("reason", "str", ""))
    pid: int
    returncode: int
    reason: str


class FileResult(Struct):
    FIELDS = (
        ("data", "bytes", b""),
        ("size", "int", 0),
        ("is_dir", "bool", False),
        ("entries", "[str]", []),
        ("error", "str?", None),
        ("error_kind", "str?", None),
    )
    data: bytes
    size: int
    is_dir: bool
    entries: list[str]
    error: str | None
    error_kind: str | None


class SbFileResult(Struct):
    TAG = "sbfileres"
    FIELDS = (("req_id", "int", R), ("result", FileResult, R))
    req_id: int
    result: FileResult


class SbTunnelHello(Struct):
    TAG = "sbtunnel"
    FIELDS = (
        ("container_id", "str", R),
        ("token", "str", R),
        ("conn_id", "int", R),
        ("error", "str", ""),
    )
    container_id: str
    token: str
    conn_id: int
    error: str


# ---------------------------------------------------------------- what it receives


class TerminalSize(Struct):
    ARRAY_LIKE = True
    FIELDS = (("rows", "int", R), ("cols", "int", R))
    rows: int
    cols: int


class SbExec(Struct):
    TAG = "sbexec"
    FIELDS = (
        ("pid", "int", R),
        ("argv", "[str]", R),
        ("workdir", "str?", None),
        ("env", "{str:str}", {}),
        ("timeout", "float?", None),
        ("pty", "bool", False),
        ("size", (TerminalSize,), None),
    )
    pid: int
    argv: list[str]
    workdir: str | None
    env: dict[str, str]
    timeout: float | None
    pty: bool
    size: TerminalSize | None


class SbResize(Struct):
    TAG = "sbresize"
    FIELDS = (("pid", "int", R), ("size", TerminalSize, R))
    pid: int
    size: TerminalSize


class SbStdin(Struct):
    TAG = "sbstdin"
    FIELDS = (("pid", "int", R), ("data", "bytes", b""), ("eof", "bool", False))
    pid: int
    data: bytes
    eof: bool


class FileRequest(Struct):
    FIELDS = (
        ("op", "str", R),
        ("path", "str", R),
        ("offset", "int", 0),
        ("length", "int", 0),
        ("data", "bytes", b""),
        ("append", "bool", False),
        ("truncate", "bool", False),
        ("recursive", "bool", False),
    )
    op: str
    path: str
    offset: int
    length: int
    data: bytes
    append: bool
    truncate: bool
    recursive: bool


class SbFile(Struct):
    TAG = "sbfile"
    FIELDS = (("req_id", "int", R), ("request", FileRequest, R))
    req_id: int
    request: FileRequest


class SbConfigure(Struct):
    TAG = "sbconf"
    FIELDS = (("env", "{str:str}", {}), ("workdir", "str?", None), ("entrypoint", "[str]", []))
    env: dict[str, str]
    workdir: str | None
    entrypoint: list[str]


class SbFlow(Struct):
    TAG = "sbflow"
    FIELDS = (("pid", "int", R), ("stream", "int", R), ("paused", "bool", R))
    pid: int
    stream: int
    paused: bool


class SbTunnelOpen(Struct):
    TAG = "sbtunopen"
    FIELDS = (("conn_id", "int", R), ("port", "int", R))
    conn_id: int
    port: int


class StopContainer(Struct):
    TAG = "stop"
    FIELDS = (("grace_s", "float", 10.0),)
    grace_s: float


class Other:
    """A frame of a message the agent does not handle (it ignores it)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag


RECEIVED: dict[str, type[Struct]] = {
    c.TAG: c  # type: ignore[misc]
    for c in (SbExec, SbResize, SbStdin, SbFile, SbConfigure, SbFlow, SbTunnelOpen, StopContainer)
}


# ---------------------------------------------------------------- encoding

_B = struct.Struct(">B")
_H = struct.Struct(">BH")
_I = struct.Struct(">BI")
_Q = struct.Struct(">BQ")
_b = struct.Struct(">Bb")
_h = struct.Struct(">Bh")
_i = struct.Struct(">Bi")
_q = struct.Struct(">Bq")
_D = struct.Struct(">Bd")


def _head(out: bytearray, n: int, fix: int, fix_max: int, c8: int | None, c16: int) -> None:
    if n <= fix_max:
        out.append(fix | n)
    elif c8 is not None and n < 0x100:
        out += bytes((c8, n))
    elif n < 0x10000:
        out += _H.pack(c16, n)
    elif n < 0x100000000:
        out += _I.pack(c16 + 1, n)
    else:
        raise ValueError("too long for msgpack")


def _pack(out: bytearray, v: Any) -> None:
    if v is None:
        out.append(0xC0)
    elif v is True:
        out.append(0xC3)
    elif v is False:
        out.append(0xC2)
    elif type(v) is int:
        if 0 <= v < 0x80:
            out.append(v)
        elif v >= 0:
            if v < 0x100:
                out += bytes((0xCC, v))
            elif v < 0x10000:
                out += _H.pack(0xCD, v)
            elif v < 0x100000000:
                out += _I.pack(0xCE, v)
            else:
                out += _Q.pack(0xCF, v)
        elif v >= -32:
            out.append(v & 0xFF)
        elif v >= -0x80:
            out += _b.pack(0xD0, v)
        elif v >= -0x8000:
            out += _h.pack(0xD1, v)
        elif v >= -0x80000000:
            out += _i.pack(0xD2, v)
        else:
            out += _q.pack(0xD3, v)
    elif type(v) is float:
        out += _D.pack(0xCB, v)
    elif type(v) is str:
        data = v.encode()
        _head(out, len(data), 0xA0, 31, 0xD9, 0xDA)
        out += data
    elif isinstance(v, (bytes, bytearray, memoryview)):
        _head(out, len(v), 0, -1, 0xC4, 0xC5)
        out += v
    elif isinstance(v, (list, tuple)):
        _head(out, len(v), 0x90, 15, None, 0xDC)
        for x in v:
            _pack(out, x)
    elif isinstance(v, dict):
        _head(out, len(v), 0x80, 15, None, 0xDE)
        for k, x in v.items():
            _pack(out, k)
            _pack(out, x)
    elif isinstance(v, Struct):
        fields = v.FIELDS
        if v.ARRAY_LIKE:
            _head(out, len(fields), 0x90, 15, None, 0xDC)
        else:
            _head(out, len(fields) + (v.TAG is not None), 0x80, 15, None, 0xDE)
            if v.TAG is not None:
                _pack(out, "t")
                _pack(out, v.TAG)
        for name, _, _ in fields:
            if not v.ARRAY_LIKE:
                _pack(out, name)
            _pack(out, getattr(v, name))
    else:
        raise TypeError(f"cannot encode {type(v).__name__}")


def encode_body(msg: Struct) -> bytes:
    out = bytearray()
    _pack(out, msg)
    return bytes(out)


def encode(msg: Struct) -> bytes:
    """A frame: the length header and the body."""
    body = encode_body(msg)
    return LEN.pack(len(body)) + body


# ---------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise FrameError("bad frame: truncated")
        view = self.data[self.pos : end]
        self.pos = end
        return view

    def count(self, fmt: str, size: int, per_item: int) -> int:
        (n,) = struct.unpack(fmt, self.take(size))
        if n * per_item > len(self.data) - self.pos:  # never allocate for a false count
            raise FrameError("bad frame: truncated")
        return n

    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise FrameError("bad frame: nested too deep")
        c = self.take(1)[0]
        if c < 0x80:
            return c
        if c >= 0xE0:
            return c - 0x100
        if 0xA0 <= c <= 0xBF:
            return self.str(c & 0x1F)
        if 0x90 <= c <= 0x9F:
            return self.array(c & 0x0F, depth)
        if 0x80 <= c <= 0x8F:
            return self.map(c & 0x0F, depth)
        if c == 0xC0:
            return None
        if c == 0xC2:
            return False
        if c == 0xC3:
            return True
        if c in _FIXED:
            fmt, size = _FIXED[c]
            return struct.unpack(fmt, self.take(size))[0]
        if c in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            fmt, size = _LENGTHS[c - 0xC4]
            return bytes(self.take(self.count(fmt, size, 1)))
        if c in (0xD9, 0xDA, 0xDB):  # str 8/16/32
            fmt, size = _LENGTHS[c - 0xD9]
            return self.str(self.count(fmt, size, 1))
        if c in (0xDC, 0xDD):  # array 16/32
            fmt, size = _LENGTHS[c - 0xDB]
            return self.array(self.count(fmt, size, 1), depth)
        if c in (0xDE, 0xDF):  # map 16/32
            fmt, size = _LENGTHS[c - 0xDD]
            return self.map(self.count(fmt, size, 2), depth)
        raise FrameError(f"bad frame: unsupported msgpack type 0x{c:02x}")

    def str(self, n: int) -> str:
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise FrameError("bad frame: invalid UTF-8") from None

    def array(self, n: int, depth: int) -> list:
        if n > len(self.data) - self.pos:
            raise FrameError("bad frame: truncated")
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict:
        if 2 * n > len(self.data) - self.pos:
            raise FrameError("bad frame: truncated")
        out = {}
        for _ in range(n):
            k = self.value(depth + 1)
            if type(k) is not str and type(k) is not int:
                raise FrameError("bad frame: a map key that is not a string")
            out[k] = self.value(depth + 1)
        return out


_FIXED = {
    0xCA: (">f", 4),
    0xCB: (">d", 8),
    0xCC: (">B", 1),
    0xCD: (">H", 2),
    0xCE: (">I", 4),
    0xCF: (">Q", 8),
    0xD0: (">b", 1),
    0xD1: (">h", 2),
    0xD2: (">i", 4),
    0xD3: (">q", 8),
}
_LENGTHS = ((">B", 1), (">H", 2), (">I", 4))


def unpack(body: bytes | memoryview) -> Any:
    """A whole msgpack body as plain values (maps as dicts); trailing bytes are an error."""
    r = _Reader(body)
    value = r.value()
    if r.pos != len(r.data):
        raise FrameError("bad frame: trailing bytes")
    return value


def _typed(kind: Any, v: Any, where: str) -> Any:
    if isinstance(kind, tuple):  # (Class,): a struct or None
        return None if v is None else _typed(kind[0], v, where)
    if isinstance(kind, list):  # [Class]
        if type(v) is not list:
            raise FrameError(f"bad frame: {where} is not an array")
        return [_typed(kind[0], x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(kind, type):
        return _struct(kind, v, where)
    if kind.endswith("?"):
        return None if v is None else _typed(kind[:-1], v, where)
    ok = {
        "int": lambda: type(v) is int,
        "float": lambda: type(v) is float or type(v) is int,
        "str": lambda: type(v) is str,
        "bytes": lambda: type(v) is bytes,
        "bool": lambda: type(v) is bool,
        "[str]": lambda: type(v) is list and all(type(x) is str for x in v),
        "{str:str}": lambda: (
            type(v) is dict and all(type(k) is str and type(x) is str for k, x in v.items())
        ),
    }[kind]()
    if not ok:
        raise FrameError(f"bad frame: {where} is not {kind}")
    return float(v) if kind == "float" else v


def _struct(cls: type[Struct], v: Any, where: str) -> Struct:
    fields = cls.FIELDS
    obj = cls.__new__(cls)
    if cls.ARRAY_LIKE:
        if type(v) is not list or not len(fields) >= len(v) >= sum(f[2] is R for f in fields):
            raise FrameError(f"bad frame: {where} is not a {cls.__name__}")
        values = dict(zip((f[0] for f in fields), v, strict=False))
    elif type(v) is dict:
        values = v
    else:
        raise FrameError(f"bad frame: {where} is not a {cls.__name__}")
    for name, kind, default in fields:
        if name in values:
            value = _typed(kind, values[name], f"{where}.{name}")
        elif default is R:
            raise FrameError(f"bad frame: {where} has no {name}")
        else:
            value = default.copy() if isinstance(default, (list, dict)) else default
        setattr(obj, name, value)
    return obj


def decode(body: bytes | memoryview) -> Struct | Other:
    """A frame's body as the message the agent receives."""
    v = unpack(body)
    if type(v) is not dict or type(v.get("t")) is not str:
        raise FrameError("bad frame: not a tagged message")
    cls = RECEIVED.get(v["t"])
    if cls is None:
        return Other(v["t"])
    return _struct(cls, v, cls.__name__)


# ---------------------------------------------------------------- the spec


class SandboxSpec:
    """What the agent reads of its container's ``FunctionSpec`` (the file
    ``$STRATO_CONTAINER_SPEC`` names): the environment and the ``SandboxConfig``."""

    def __init__(self, env: dict[str, str], entrypoint: list[str], workdir: str | None) -> None:
        self.env = env
        self.entrypoint = entrypoint
        self.workdir = workdir


def load_sandbox_spec(data: bytes) -> SandboxSpec:
    spec = unpack(data)
    if type(spec) is not dict or type(spec.get("sandbox")) is not dict:
        raise FrameError("the container's spec has no sandbox")
    config = spec["sandbox"]
    return SandboxSpec(
        _typed("{str:str}", spec.get("env", {}), "spec.env"),
        _typed("[str]", config.get("entrypoint", []), "spec.sandbox.entrypoint"),
        _typed("str?", config.get("workdir"), "spec.sandbox.workdir"),
    )
