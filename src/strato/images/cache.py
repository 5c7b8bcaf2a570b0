"""The on-disk build cache, shared by every build and every node on a machine.

Layout under ``cache_dir``::

    layers/<key>/              a finished layer: the files of one step (an overlay upperdir)
    layers/<key>.json          its metadata: size, step, build time
    layers/<key>.tmp-<pid>-*/  a layer being built (``upper/``, ``work/``, ``merged/``)
    locks/<key>.lock           flock held while a layer is built
    images/<image_id>.json     an image manifest: its layers and run-time settings
    tools/                     build tools (uv)

A layer directory appears only by ``rename`` of a finished build, so a layer that exists is
complete. Removal renames it out of the way first (``<key>.del-<pid>-*``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from strato.images.errors import ImageBuildError

LOCK_POLL_S = 0.2


@dataclass
class ImageManifest:
    """What a finished build recorded; enough to rebuild :class:`BuiltImage` offline."""

    image_id: str
    layers: list[str]  # layer keys, bottom first (the strato deps layer last)
    env: dict[str, str]
    workdir: str | None
    python: str
    python_version: str
    strato_deps: str
    deps_key: str
    release: str
    steps: list[str]  # one description per step
    created: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageManifest:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ImageInfo:
    """One cached image, for ``strato image list``."""

    image_id: str
    created: float
    python_version: str
    release: str
    steps: list[str]
    layers: list[str]
    size_bytes: int
    """Bytes of its layers (layers shared with other images count in each)."""


class BuildCache:
    """Paths, locks and manifests of one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers = self.root / "layers"
        self.locks = self.root / "locks"
        self.images = self.root / "images"
        self.tools = self.root / "tools"

    def ensure(self) -> None:
        for d in (self.layers, self.locks, self.images, self.tools):
            d.mkdir(parents=True, exist_ok=True)
        if any(c in str(self.layers) for c in ",:"):
            raise ImageBuildError(
                f"the image cache {self.root} has ',' or ':' in its path, which overlay "
                "mounts cannot take; choose another STRATO_HOME"
            )

    # -- layers -------------------------------------------------------------------------

    def layer_dir(self, key: str) -> Path:
        return self.layers / key

    def has_layer(self, key: str) -> bool:
        return (self.layers / key).is_dir()

    def new_temp(self, key: str) -> Path:
        tmp = self.layers / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def clear_stale_temps(self, key: str) -> None:
        """Remove leftovers of interrupted builds of ``key`` (call with its lock held)."""
        for stale in self.layers.glob(f"{key}.tmp-*"):
            remove_tree(stale)

    def commit_layer(self, key: str, built_root: Path, meta: dict[str, object]) -> bool:
        """Move a finished layer into place; False if one was there already."""
        meta_tmp = self.layers / f"{key}.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        meta_tmp.write_text(json.dumps(meta, sort_keys=True))
        try:
            os.rename(built_root, self.layers / key)
        except OSError:
            meta_tmp.unlink(missing_ok=True)
            if self.has_layer(key):
                return False
            raise
        os.replace(meta_tmp, self.layers / f"{key}.json")
        return True

    def layer_meta(self, key: str) -> dict[str, object]:
        try:
            return json.loads((self.layers / f"{key}.json").read_text())
        except (OSError, ValueError):
            return {}

    def layer_size(self, key: str) -> int:
        size = self.layer_meta(key).get("size")
        if isinstance(size, int):
            return size
        return tree_size(self.layers / key) if self.has_layer(key) else 0

    def remove_layer(self, key: str) -> int:
        """Delete a layer unless it is being built; returns the bytes freed."""
        path = self.layers / key
        if not path.is_dir():
            return 0
        with self.try_lock(key) as locked:
            if not locked:
                return 0
            size = self.layer_size(key)
            doomed = self.layers / f"{key}.del-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return 0
            (self.layers / f"{key}.json").unlink(missing_ok=True)
            remove_tree(doomed)
            return size

    # -- locks --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self, key: str, timeout: float, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold the build lock of ``key`` (an flock: one holder across threads, processes
        and nodes sharing this directory). Raises :class:`ImageBuildError` after
        ``timeout`` seconds of waiting."""
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                deadline = time.monotonic() + timeout
                while True:
                    time.sleep(LOCK_POLL_S)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise ImageBuildError(
                                f"waited {timeout:.0f}s for another build of layer "
                                f"{key[:12]} to finish; it may be stuck (see "
                                f"{self.locks / (key + '.lock')})"
                            ) from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # -- manifests ----------------------------------------------------------------------

    def manifest_path(self, image_id: str) -> Path:
        return self.images / f"{image_id}.json"

    def read_manifest(self, image_id: str) -> ImageManifest | None:
        try:
            return ImageManifest.from_json(self.manifest_path(image_id).read_text())
        except (OSError, ValueError, TypeError):
            return None

    def write_manifest(self, manifest: ImageManifest) -> None:
        path = self.manifest_path(manifest.image_id)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, path)

    def manifests(self) -> list[ImageManifest]:
        found = []
        for path in sorted(self.images.glob("im-*.json")) if self.images.is_dir() else []:
            manifest = self.read_manifest(path.name[: -len(".json")])
            if manifest is not None:
                found.append(manifest)
        return found


def tree_size(path: Path) -> int:
    """Bytes on disk under ``path`` (hard links counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def remove_tree(path: Path) -> None:
    """``rm -rf``, also of overlayfs work dirs (mode 000)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError:
        for dirpath, _dirs, _files in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, 0o700)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# the ``strato image list|rm|prune`` operations


def list_images(cache_dir: Path) -> list[ImageInfo]:
    """Every complete cached image, newest first."""
    cache = BuildCache(cache_dir)
    infos = []
    for m in cache.manifests():
        if not all(cache.has_layer(k) for k in m.layers):
            continue
        infos.append(
            ImageInfo(
                image_id=m.image_id,
                created=m.created,
                python_version=m.python_version,
                release=m.release,
                steps=m.steps,
                layers=[str(cache.layer_dir(k)) for k in m.layers],
                size_bytes=sum(cache.layer_size(k) for k in m.layers),
            )
        )
    return sorted(infos, key=lambda i: i.created, reverse=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove_unreferenced_layers(cache: BuildCache, min_age_s: float) -> int:
    referenced = {k for m in cache.manifests() for k in m.layers}
    freed = 0
    for path in sorted(cache.layers.iterdir()) if cache.layers.is_dir() else []:
        name = path.name
        if ".del-" in name:  # a removal that was interrupted
            freed += tree_size(path)
            remove_tree(path)
        elif ".tmp-" in name:
            key = name.split(".", 1)[0]
            with cache.try_lock(key) as locked:
                if locked and _age(path) >= min_age_s:  # an interrupted build's leftovers
                    freed += tree_size(path)
                    remove_tree(path)
        elif "." not in name and path.is_dir():
            created = cache.layer_meta(name).get("created")
            age = time.time() - created if isinstance(created, float | int) else _age(path)
            if name not in referenced and age >= min_age_s:
                freed += cache.remove_layer(name)
        elif name.endswith(".json") and not (cache.layers / name[: -len(".json")]).exists():
            path.unlink(missing_ok=True)
    return freed


def remove_image(cache_dir: Path, image_id: str) -> int:
    """Forget an image and delete the layers no other cached image uses; returns the bytes
    freed. Raises :class:`strato.exceptions.NotFoundError` if no such image is cached."""
    from strato.exceptions import NotFoundError

    cache = BuildCache(cache_dir)
    path = cache.manifest_path(image_id)
    if not path.is_file():
        raise NotFoundError(f"no cached image {image_id!r}; see `strato image list`")
    manifest = cache.read_manifest(image_id)
    path.unlink(missing_ok=True)
    if manifest is None:
        return 0
    referenced = {k for m in cache.manifests() for k in m.layers}
    return sum(cache.remove_layer(k) for k in manifest.layers if k not in referenced)


def prune(cache_dir: Path, keep: set[str], *, min_age_s: float = 600.0) -> int:
    """Delete every image not in ``keep`` and every layer no kept image uses (including
    leftovers of interrupted builds); returns the bytes freed.

    Pass the images of running containers in ``keep``: their layers are their root
    filesystems. Unreferenced layers younger than ``min_age_s`` stay, as a build in
    progress may be about to reference them."""
    cache = BuildCache(cache_dir)
    for m in cache.manifests():
        if m.image_id not in keep:
            cache.manifest_path(m.image_id).unlink(missing_ok=True)
    for stray in cache.images.glob("*.tmp-*") if cache.images.is_dir() else []:
        if _age(stray) >= min_age_s:
            stray.unlink(missing_ok=True)
    return _remove_unreferenced_layers(cache, min_age_s)
