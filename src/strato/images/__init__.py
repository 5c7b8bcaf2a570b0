"""Images: specs -> content-addressed layers -> a root filesystem, with a build cache.

``build(spec, cache_dir, fetch_blob=..., log=...)`` returns a :class:`BuiltImage` whose
``layers`` a runtime stacks with overlayfs. ``list_images``/``remove_image``/``prune``
serve ``strato image list|rm|prune``. The spec types live in :mod:`strato.protocol.images`.
"""

from strato.images.builder import BuiltImage, build, cached_image
from strato.images.cache import ImageInfo, list_images, prune, remove_image
from strato.images.errors import ImageBuildError
from strato.images.run import run_in_image

__all__ = [
    "BuiltImage",
    "ImageBuildError",
    "ImageInfo",
    "build",
    "cached_image",
    "list_images",
    "prune",
    "remove_image",
    "run_in_image",
]
