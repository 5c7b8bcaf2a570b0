"""The error of a failed image build (defined in :mod:`strato.exceptions`)."""

from strato.exceptions import ImageBuildError

__all__ = ["ImageBuildError"]
