"""The machinery of ``STRATO_*`` settings: ``Setting`` (one variable: its type, default,
meaning and readers), the registry every declaration joins, and the constructors the
``settings_*`` modules declare with (``integer``, ``number``, ``flag``, ``text``,
``path``...). Re-exported by ``strato.settings``.

Only the standard library is imported: the container's start path and the runtimes read
settings too.
"""

from __future__ import annotations

import math
import os
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
