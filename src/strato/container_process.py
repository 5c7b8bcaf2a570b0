"""Modal's module path ``modal.container_process``."""

from strato.sdk.container_process import ContainerProcess, StreamReader, StreamWriter

__all__ = ["ContainerProcess", "StreamReader", "StreamWriter"]
