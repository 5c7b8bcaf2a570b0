"""The error of a failed image build (to move into :mod:`strato.exceptions`)."""

from __future__ import annotations

from strato.exceptions import ExecutionError


class ImageBuildError(ExecutionError):
    """An image step failed; the message has its command and the end of its output."""

    def __init__(self, message: str, *, command: str = "", output_tail: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.output_tail = output_tail

    def __reduce__(self):  # keep command/output_tail through pickling
        return (_rebuild, (type(self), str(self), self.command, self.output_tail))


def _rebuild(cls: type[ImageBuildError], message: str, command: str, tail: str) -> ImageBuildError:
    return cls(message, command=command, output_tail=tail)
