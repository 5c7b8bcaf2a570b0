"""Decorators that mark methods and shape input handling: ``@enter``, ``@exit``,
``@method``, ``parameter()``, ``@concurrent``, ``@batched`` (Modal's names).

They only annotate the function (``__strato_*__`` attributes); ``App.function`` and
``App.cls`` read the annotations, and the container entrypoint acts on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strato.exceptions import InvalidError

MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000
PARAMETER_TYPES = (int, str, bytes, bool)

_MISSING = object()


def _mark(f: Callable, attr: str, value: object) -> Callable:
    """Mark ``f`` (read back with ``getattr(f, attr, None)`` when the app is built)."""
    setattr(f, attr, value)
    return f


def _in_class_body(f: Callable) -> bool:
    """Whether ``f`` was defined directly in a class body (its qualname ends in
    ``Class.name``, not ``function.<locals>.name``)."""
    parts = getattr(f, "__qualname__", "").split(".")
    return len(parts) > 1 and parts[-2] != "<locals>" and not isinstance(f, type)


def _as_method(f: Callable) -> None:
    """``@batched`` / ``@concurrent`` on a class method make it a method, as in Modal
    (no separate ``@method()``); a ``@method()`` mark already there is kept."""
    if _in_class_body(f) and not hasattr(f, "__strato_method__"):
        f.__strato_method__ = {"is_generator": None}  # type: ignore[attr-defined]


def _no_parens(name: str, arg) -> None:
    if arg is not None:
        raise InvalidError(f"Did you forget parentheses? Use `@strato.{name}()`.")


def enter(_warn_parentheses_missing=None, *, snap: bool = False) -> Callable:
    """Run the method once when a container starts, before its first input. With
    ``snap=True`` it runs before a memory snapshot is taken (``enable_memory_snapshot``)."""
    _no_parens("enter", _warn_parentheses_missing)

    def mark(f: Callable) -> Callable:
        return _mark(f, "__strato_enter__", {"snap": bool(snap)})

    return mark


def exit(_warn_parentheses_missing=None) -> Callable:  # noqa: A001 - Modal's name
    """Run the method when the container shuts down (scale-down or SIGTERM)."""
    _no_parens("exit", _warn_parentheses_missing)

    def mark(f: Callable) -> Callable:
        return _mark(f, "__strato_exit__", True)

    return mark


def method(_warn_parentheses_missing=None, *, is_generator: bool | None = None) -> Callable:
    """Mark a method of an ``@app.cls`` class as callable remotely."""
    _no_parens("method", _warn_parentheses_missing)

    def mark(f: Callable) -> Callable:
        return _mark(f, "__strato_method__", {"is_generator": is_generator})

    return mark


@dataclass(frozen=True)
class _Parameter:
    default: Any = _MISSING
    init: bool = True

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def parameter(*, default: Any = _MISSING, init: bool = True) -> Any:
    """A constructor parameter of an ``@app.cls`` class (int, str, bytes or bool). Each
    distinct set of values gets its own pool of containers."""
    if default is not _MISSING and not isinstance(default, PARAMETER_TYPES):
        raise InvalidError(
            f"parameter(default={default!r}): defaults must be int, str, bytes or bool"
        )
    return _Parameter(default, init)


@dataclass(frozen=True)
class ConcurrencyConfig:
    max_inputs: int
    target_inputs: int | None = None


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int
    wait_ms: int


def concurrent(
    _warn_parentheses_missing=None, *, max_inputs: int, target_inputs: int | None = None
) -> Callable:
    """Let one container run up to ``max_inputs`` inputs at once (threads for sync
    functions, tasks for async ones); the autoscaler aims at ``target_inputs``."""
    _no_parens("concurrent", _warn_parentheses_missing)
    if isinstance(max_inputs, bool) or not isinstance(max_inputs, int) or max_inputs < 1:
        raise InvalidError(f"concurrent(max_inputs={max_inputs!r}): use an int >= 1")
    if target_inputs is not None and (
        isinstance(target_inputs, bool)
        or not isinstance(target_inputs, int)
        or not 1 <= target_inputs <= max_inputs
    ):
        raise InvalidError(
            f"concurrent(target_inputs={target_inputs!r}): use an int from 1 "
            f"to max_inputs ({max_inputs})"
        )

    def mark(f: Callable) -> Callable:
        _as_method(f)
        return _mark(f, "__strato_concurrency__", ConcurrencyConfig(max_inputs, target_inputs))

    return mark


def batched(_warn_parentheses_missing=None, *, max_batch_size: int, wait_ms: int) -> Callable:
    """Gather single calls into lists of up to ``max_batch_size``, waiting at most
    ``wait_ms``; the function takes and returns lists."""
    _no_parens("batched", _warn_parentheses_missing)
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or not (1 <= max_batch_size <= MAX_BATCH_SIZE)
    ):
        raise InvalidError(f"batched(max_batch_size={max_batch_size!r}): use 1 to {MAX_BATCH_SIZE}")
    if (
        isinstance(wait_ms, bool)
        or not isinstance(wait_ms, int)
        or not (0 <= wait_ms < MAX_BATCH_WAIT_MS)
    ):
        raise InvalidError(f"batched(wait_ms={wait_ms!r}): use 0 to {MAX_BATCH_WAIT_MS - 1} ms")

    def mark(f: Callable) -> Callable:
        _as_method(f)
        return _mark(f, "__strato_batch__", BatchConfig(max_batch_size, wait_ms))

    return mark
