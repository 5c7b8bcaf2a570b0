"""Errors a strato user can meet.

Names follow Modal's ``modal.exception`` so that ported code catches the same classes.
Every message says what to do next.
"""

from __future__ import annotations

import builtins


class Error(Exception):
    """Base class of every strato error."""


class InvalidError(Error):
    """An argument or definition is not valid; the message says which and why."""


class SettingError(InvalidError):
    """A ``STRATO_*`` environment variable has a value strato cannot use.

    ``name`` is the variable, ``value`` its text as given."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"{name}={value!r} is not valid: expected {expected}.")
        self.name = name
        self.value = value
        self.expected = expected

    def __reduce__(self):  # rebuilt from its three parts, not from the message alone
        return (SettingError, (self.name, self.value, self.expected))


class NotFoundError(Error):
    """A named object (app, function, call, blob) does not exist."""


class AlreadyExistsError(Error):
    """An object with that name exists already."""


class AuthError(Error):
    """The control plane refused the token."""


class PermissionDeniedError(AuthError):
    """The token is valid, but its role may not do this (a read-only token that tries to
    change something, a workspace token on an operator route)."""


class ConnectionError(Error):  # noqa: A001 - Modal's name
    """The control plane cannot be reached."""


class SerializationError(Error):
    """A value could not be pickled to be sent."""


class DeserializationError(Error):
    """A value sent by the other side could not be unpickled here."""


class ExecutionError(Error):
    """Something went wrong running the function, outside the user's own code."""


class ContainerDiedError(ExecutionError):
    """The container running an input died (signal, crash, out of memory)."""


class OutOfMemoryError(ContainerDiedError):
    """The container exceeded its memory limit and was killed."""


class ResourceUnavailableError(ExecutionError):
    """No node of the cluster can ever satisfy the function's resources."""


class ContainerStartError(ExecutionError):
    """The worker agent could not start the container."""


class ImageBuildError(ExecutionError):
    """A step of an image build failed; the message has its command and output tail."""

    def __init__(self, message: str, *, command: str = "", output_tail: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.output_tail = output_tail

    def __reduce__(self):  # keep command/output_tail through pickling
        return (_rebuild_image_error, (type(self), str(self), self.command, self.output_tail))


class RemoteError(Error):
    """A remote exception whose type cannot be imported here.

    ``type_name`` holds the remote type's qualified name.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - Modal's name
    """A wait ran past its timeout.

    Also the builtin ``TimeoutError``: Modal's ``FunctionCall.get(timeout=)`` raises the
    builtin one, so ported ``except TimeoutError:`` clauses catch this."""


class FunctionTimeoutError(TimeoutError):
    """An input ran past the function's ``timeout``."""


class OutputExpiredError(TimeoutError):
    """The output of a call is no longer stored (past its retention)."""


class RequestSizeError(InvalidError):
    """A payload is larger than the configured limit."""


class AppStoppedError(InvalidError):
    """The function belongs to an app that has been stopped."""


class RouteConflictError(AlreadyExistsError):
    """A web endpoint's URL is already served by another app (web URLs are unique across
    apps); the message names the other app."""


class VersionError(Error):
    """The client and the control plane do not speak the same version."""


class InternalError(Error):
    """strato itself failed; the message says where."""


class InternalFailure(Error):
    """A failure inside strato that a retry may get past."""


class ClientClosed(Error):
    """The client was closed while a request was in flight."""


class SandboxTerminatedError(Error):
    """The sandbox was terminated."""


class FilesystemExecutionError(Error):
    """A filesystem operation in a container failed."""


class SandboxTimeoutError(TimeoutError):
    """A sandbox ran past its timeout."""


# --- sandboxes: a file operation in a sandbox that failed, by the OS's reason
class SandboxFilesystemError(FilesystemExecutionError):
    """A file operation in a sandbox failed."""


class SandboxFilesystemNotFoundError(SandboxFilesystemError, FileNotFoundError):
    """No such file or folder in the sandbox."""


class SandboxFilesystemPermissionError(SandboxFilesystemError, PermissionError):
    """The sandbox's user may not do that to that path."""


class SandboxFilesystemIsADirectoryError(SandboxFilesystemError, IsADirectoryError):
    """The path is a folder."""


class SandboxFilesystemNotADirectoryError(SandboxFilesystemError, NotADirectoryError):
    """A part of the path is not a folder."""


class SandboxFilesystemDirectoryNotEmptyError(SandboxFilesystemError):
    """The folder is not empty (remove it with recursive=True)."""


class SandboxFilesystemFileExistsError(SandboxFilesystemError, FileExistsError):
    """The path exists already."""


class MountUploadTimeoutError(TimeoutError):
    """Uploading local files took too long."""


class VolumeUploadTimeoutError(TimeoutError):
    """Uploading to a volume took too long."""


class InteractiveTimeoutError(TimeoutError):
    """An interactive session timed out."""


class DeprecationError(UserWarning):
    """A warning: the API used is deprecated and will go (Modal's name)."""


class PendingDeprecationError(UserWarning):
    """A warning: the API used will be deprecated (Modal's name)."""


class ServerWarning(UserWarning):
    """A warning the control plane sent."""


class ModuleNotMountable(Exception):
    """A module cannot be shipped to containers (Modal's name)."""


class UserCodeException(Exception):
    """Modal's former wrapper of an exception returned by ``map(return_exceptions=True)``;
    strato returns the original exception (as Modal does since 1.4), so this is only here
    for code that names it."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


class InputCancellation(BaseException):
    """The input was cancelled.

    A ``BaseException``, as in Modal, so that a bare ``except Exception`` in user code does
    not swallow a cancellation.
    """


ERRORS_BY_NAME: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        Error,
        InvalidError,
        NotFoundError,
        AlreadyExistsError,
        AuthError,
        ConnectionError,
        SerializationError,
        DeserializationError,
        ExecutionError,
        ContainerDiedError,
        OutOfMemoryError,
        ResourceUnavailableError,
        ContainerStartError,
        ImageBuildError,
        TimeoutError,
        FunctionTimeoutError,
        OutputExpiredError,
        RequestSizeError,
        AppStoppedError,
        RouteConflictError,
        InputCancellation,
        VersionError,
        InternalError,
        InternalFailure,
        ClientClosed,
        SandboxTerminatedError,
        FilesystemExecutionError,
        SandboxTimeoutError,
        SandboxFilesystemError,
        SandboxFilesystemNotFoundError,
        SandboxFilesystemPermissionError,
        SandboxFilesystemIsADirectoryError,
        SandboxFilesystemNotADirectoryError,
        SandboxFilesystemDirectoryNotEmptyError,
        SandboxFilesystemFileExistsError,
    )
}


def _rebuild_image_error(cls, message: str, command: str, tail: str) -> ImageBuildError:
    return cls(message, command=command, output_tail=tail)
