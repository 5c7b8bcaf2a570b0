"""``strato.exception``: Modal's module name for strato's errors (``modal.exception``).

The same objects as ``strato.exceptions``, so ``except modal.exception.NotFoundError``
in ported code catches what strato raises."""

from strato.exceptions import (
    ERRORS_BY_NAME,
    AlreadyExistsError,
    AppStoppedError,
    AuthError,
    ConnectionError,  # noqa: A004
    ContainerDiedError,
    ContainerStartError,
    DeserializationError,
    Error,
    ExecutionError,
    FunctionTimeoutError,
    ImageBuildError,
    InputCancellation,
    InvalidError,
    NotFoundError,
    OutOfMemoryError,
    OutputExpiredError,
    RemoteError,
    RequestSizeError,
    ResourceUnavailableError,
    RouteConflictError,
    SerializationError,
    SettingError,
    TimeoutError,  # noqa: A004
    UserCodeException,
)

__all__ = [
    "ERRORS_BY_NAME",
    "AlreadyExistsError",
    "AppStoppedError",
    "AuthError",
    "ConnectionError",
    "ContainerDiedError",
    "ContainerStartError",
    "DeserializationError",
    "Error",
    "ExecutionError",
    "FunctionTimeoutError",
    "ImageBuildError",
    "InputCancellation",
    "InvalidError",
    "NotFoundError",
    "OutOfMemoryError",
    "OutputExpiredError",
    "RemoteError",
    "RequestSizeError",
    "ResourceUnavailableError",
    "RouteConflictError",
    "SerializationError",
    "SettingError",
    "TimeoutError",
    "UserCodeException",
]
