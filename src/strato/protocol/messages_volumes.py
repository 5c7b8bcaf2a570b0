"""Wire types of volumes: a function's or sandbox's mounts, volumes' files, manifests,
commits and copies (``strato.Volume``). Re-exported by ``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from .messages_base import Count, Timestamp

VOLUME_NAME_MAX = 64
VOLUME_PATH_MAX = 4096
VolumeName = Annotated[str, Meta(min_length=1, max_length=VOLUME_NAME_MAX)]
VolumePath = Annotated[str, Meta(max_length=VOLUME_PATH_MAX)]
BlockKey = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class VolumeMount(msgspec.Struct, frozen=True):
    """A volume mounted in a function's containers at ``path``. The SDK names it (``name``,
    or the ``volume_id`` of an ephemeral one); the id is filled in when the app is created."""

    path: VolumePath
    volume_id: Annotated[str, Meta(max_length=64)] = ""
    name: VolumeName | None = None
    read_only: bool = False
    create_if_missing: bool = False


# A volume's file: its content is the concatenation of ``blocks`` (content-addressed blobs
# of at most VOLUME_BLOCK bytes each).
VOLUME_BLOCK = 8 << 20
VOLUME_INLINE = 4096  # a file up to this size travels and is stored inline, not as a blob


class VolumeFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # a field this side does not know is refused, never dropped: a control plane older
    # than its client once read inline files (``data``) as files without blocks
    path: VolumePath
    size: Annotated[int, Meta(ge=0, le=1 << 50)]
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o644
    mtime: Timestamp = 0.0
    blocks: Annotated[list[BlockKey], Meta(max_length=1 << 24)] = []
    data: Annotated[bytes, Meta(max_length=VOLUME_INLINE)] | None = None  # inline content


class VolumeInfo(msgspec.Struct):
    volume_id: str
    name: str | None
    created_at: Timestamp
    version: Count = 0
    size: Count = 0
    n_files: Count = 0


class VolumeList(msgspec.Struct):
    volumes: list[VolumeInfo]


class CreateVolume(msgspec.Struct):
    name: VolumeName | None = None  # None: an ephemeral volume
    create_if_missing: bool = False
    exists_ok: bool = True  # strato volume create: False (an error when it exists)


class VolumeManifest(msgspec.Struct):
    volume_id: str
    version: Count
    files: list[VolumeFile]


class VolumeCommit(msgspec.Struct, forbid_unknown_fields=True):
    """Changes merged into the latest version: per file, the last commit wins."""

    puts: Annotated[list[VolumeFile], Meta(max_length=1 << 22)] = []
    deletes: Annotated[list[VolumePath], Meta(max_length=1 << 22)] = []
    recursive_deletes: Annotated[list[VolumePath], Meta(max_length=1024)] = []
    missing_ok: bool = True  # False: a delete of a path that is not there is an error


class VolumeVersion(msgspec.Struct):
    version: Count
    size: Count = 0
    n_files: Count = 0


class VolumeCopy(msgspec.Struct):
    src_paths: Annotated[list[VolumePath], Meta(min_length=1, max_length=10_000)]
    dst: VolumePath
    recursive: bool = False  # directories are copied only with recursive=True


class BlobBatch(msgspec.Struct):
    """Small blobs in one request (each stored under its sha256)."""

    blobs: Annotated[list[bytes], Meta(max_length=100_000)]


class BlobKeys(msgspec.Struct):
    keys: Annotated[list[BlockKey], Meta(max_length=100_000)]
