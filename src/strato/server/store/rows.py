"""Typed rows of the store's tables, as its callers see them: callers never name the
store's columns or bind parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FunctionRow:
    function_id: str
    app_id: str
    name: str
    spec: bytes  # msgpack FunctionSpec
    app_state: str


@dataclass
class CallRow:
    call_id: str
    function_id: str
    kind: str
    method: str | None
    n_inputs: int
    closed: bool
    cancelled: bool
    created_at: float
    expires_at: float
    # a call made from inside a container: the input that made it, and that input's app
    parent_input_id: int | None = None
    caller_app_id: str | None = None


@dataclass
class InputRow:
    input_id: int
    call_id: str
    idx: int
    args: bytes | None
    args_blob: str | None


@dataclass
class FinalRow:
    """The final output of one input."""

    input_id: int
    status: str
    output: bytes | None
    output_blob: str | None
    error: str | None
    traceback: str | None
    seq: int
    done_at: float
    error_type: str | None = None


@dataclass
class GenItemRow:
    seq: int
    call_id: str
    idx: int
    gen_index: int
    data: bytes | None
    blob: str | None


@dataclass
class PendingRow:
    input_id: int
    call_id: str
    idx: int
    function_id: str
    args: bytes | None
    args_blob: str | None
    attempts: int
    retry_at: float | None
    method: str | None


@dataclass
class OutputRow:
    idx: int
    status: str
    data: bytes | None
    blob: str | None
    error: str | None
    traceback: str | None
    seq: int
    gen_index: int | None = None
    error_type: str | None = None


@dataclass
class GraphCallRow:
    """A call in a call graph: who made it (``parent_input_id``; None for the root)."""

    call_id: str
    function_id: str
    method: str | None
    parent_input_id: int | None


@dataclass
class GraphInputRow:
    """An input in a call graph: ``out_status`` is None while it has no final output."""

    input_id: int
    call_id: str
    idx: int
    out_status: str | None


@dataclass
class CallGraphRows:
    """A call and the calls its inputs made, recursively, level by level: at most
    ``max_depth`` levels and ``max_inputs`` inputs (``truncated`` when there is more)."""

    calls: list[GraphCallRow]
    inputs: list[GraphInputRow]
    functions: list[FunctionRow]
    truncated: bool
