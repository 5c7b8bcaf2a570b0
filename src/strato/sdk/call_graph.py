"""A call's graph as Modal shows it: ``FunctionCall.get_call_graph()`` returns the call's
inputs (`InputInfo`), each with the inputs of the calls its code made, recursively."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from strato.protocol import messages as m


class InputStatus(IntEnum):
    """The status of a function input (Modal's values)."""

    PENDING = 0
    SUCCESS = 1
    FAILURE = 2
    INIT_FAILURE = 5
    TERMINATED = 3
    TIMEOUT = 4

    @classmethod
    def _missing_(cls, value: object) -> InputStatus:
        return cls.PENDING


@dataclass
class InputInfo:
    """One input of a call graph: ``children`` are the inputs of the calls its code made
    (``.remote()``, ``.spawn()``, ``.map()`` ... from inside its container)."""

    input_id: str
    function_call_id: str
    task_id: str  # the container that ran it, or "" (not started, or not known any more)
    status: InputStatus
    function_name: str
    module_name: str
    children: list[InputInfo]


def from_wire(graph: m.CallGraph) -> list[InputInfo]:
    """The `InputInfo` trees of a ``GET /calls/{id}/graph`` answer."""
    return [_info(i) for i in graph.inputs]


def _info(i: m.GraphInput) -> InputInfo:
    return InputInfo(
        i.input_id,
        i.function_call_id,
        i.task_id,
        InputStatus[i.status],
        i.function_name,
        i.module_name,
        [_info(c) for c in i.children],
    )
