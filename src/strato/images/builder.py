"""Build an :class:`ImageSpec` into cached layers: ``build(spec, cache_dir, ...)``.

Every layer-making step becomes ``cache_dir/layers/<key>`` (see :mod:`.cache`). A layer is
built once under its lock, into a temporary directory renamed into place on success, and
reused by every later build. A rebuild of a cached image reads one manifest and checks
that its layer directories exist: no subprocess, no network.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strato.images import deps
from strato.images.base import IMAGE_PYTHON, build_base, require_root_and_tools
from strato.images.cache import BuildCache, ImageManifest, remove_tree, tree_size
from strato.images.errors import ImageBuildError
from strato.images.hostconf import Bind, PackageSources, debian_mirror, package_sources
from strato.images.sandbox import RunResult, run_in_layers
from strato.images.snapshot import unpack_layer
from strato.images.steps import STAGE, TOOLS, build_env, plan_step
from strato.protocol.images import (
    DEFAULT_PATH,
    DebianSlim,
    Env,
    ImageSpec,
    ImageStep,
    SnapshotLayer,
    Workdir,
    describe_step,
    layer_keys,
    validate_spec,
)

DEFAULT_STEP_TIMEOUT_S = 3600.0
DEFAULT_LOCK_TIMEOUT_S = 7200.0


@dataclass
class BuiltImage:
    """A built image, ready to run: stack ``layers`` read-only (bottom first), add a
    writable layer on top, set ``env``, start in ``workdir`` (or ``/``)."""

    image_id: str
    layers: list[str]
    """Layer directories, bottom first (overlayfs wants them top first in ``lowerdir``)."""
    env: dict[str, str]
    """``PATH``, ``LANG`` and the image's ``env()`` variables."""
    workdir: str | None
    python: str
    """The image's Python, e.g. ``/usr/bin/python3``."""
    python_version: str
    strato_deps: str
    """In-image directory with msgspec and cloudpickle for ``python``: put it on
    ``PYTHONPATH`` (after strato's own source) in containers."""


def _from_manifest(cache: BuildCache, m: ImageManifest) -> BuiltImage:
    return BuiltImage(
        image_id=m.image_id,
        layers=[str(cache.layer_dir(k)) for k in m.layers],
        env=dict(m.env),
        workdir=m.workdir,
        python=m.python,
        python_version=m.python_version,
        strato_deps=m.strato_deps,
    )


def cached_image(spec: ImageSpec, cache_dir: Path) -> BuiltImage | None:
    """The built image of ``spec`` if every layer of it is cached, else None (no I/O
    beyond reading the manifest and checking that directories exist)."""
    keys = layer_keys(spec)
    if not keys:
        return None
    cache = BuildCache(cache_dir)
    m = cache.read_manifest("im-" + keys[-1][:32])
    if m is None or m.deps_key != deps.deps_key(keys[0]) or m.layers[-1] != m.deps_key:
        return None
    if not all(cache.has_layer(k) for k in m.layers):
        return None
    return _from_manifest(cache, m)


def build(
    spec: ImageSpec,
    cache_dir: Path,
    *,
    fetch_blob: Callable[[str], bytes],
    log: Callable[[str], None],
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> BuiltImage:
    """Build ``spec`` (or find it cached) under ``cache_dir``.

    ``fetch_blob(sha256)`` returns the bytes of an :class:`AddFiles` blob; ``log`` gets
    progress and build output, one line per call. A failed step raises
    :class:`ImageBuildError` with its command and the end of its output, leaving no layer
    of it in the cache. Steps time out after ``step_timeout`` seconds; waiting for another
    build of the same layer, after ``lock_timeout``.
    """
    validate_spec(spec)
    found = cached_image(spec, cache_dir)
    if found is not None:
        log(f"using cached image {found.image_id}")
        return found
    return _Build(spec, BuildCache(cache_dir), fetch_blob, log, step_timeout, lock_timeout).run()


class _Build:
    def __init__(
        self,
        spec: ImageSpec,
        cache: BuildCache,
        fetch_blob: Callable[[str], bytes],
        log: Callable[[str], None],
        step_timeout: float,
        lock_timeout: float,
    ) -> None:
        self.spec = spec
        self.cache = cache
        self.fetch_blob = fetch_blob
        self.log = log
        self.step_timeout = step_timeout
        self.lock_timeout = lock_timeout
        self.keys = layer_keys(spec)
        self.image_id = "im-" + self.keys[-1][:32]
        base = spec.steps[0]
        assert isinstance(base, DebianSlim)  # ImageSpec's validation puts the base first
        self.base: DebianSlim = base
        self.env: dict[str, str] = {}
        self.workdir: str | None = None
        self.layers: list[str] = []
        self._sources: PackageSources | None = None

    @property
    def sources(self) -> PackageSources:
        if self._sources is None:
            self._sources = package_sources()
        return self._sources

    def run(self) -> BuiltImage:
        t0 = time.monotonic()
        self.cache.ensure()
        n = len(self.spec.steps)
        for i, (step, key) in enumerate(zip(self.spec.steps, self.keys, strict=True), 1):
            self.log(f"building image {self.image_id}: step {i}/{n} {describe_step(step)}")
            if isinstance(step, Env):
                self.env.update(step.vars)
                continue
            self._ensure_layer(key, step, f"{i}/{n}")
            if isinstance(step, Workdir):  # after its layer: that creates the directory
                self.workdir = os.path.normpath(step.path)
        deps_key = deps.deps_key(self.keys[0])
        self.log(f"building image {self.image_id}: strato runtime (msgspec, cloudpickle, uvicorn)")
        self._ensure_deps(deps_key)
        manifest = ImageManifest(
            image_id=self.image_id,
            layers=[*self.layers, deps_key],
            env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **self.env},
            workdir=self.workdir,
            python=IMAGE_PYTHON,
            python_version=self.base.python_version,
            strato_deps=deps.DEPS_DIR,
            deps_key=deps_key,
            release=self.base.release,
            steps=[describe_step(s) for s in self.spec.steps],
            created=time.time(),
        )
        self.cache.write_manifest(manifest)
        self.log(f"built image {self.image_id} in {time.monotonic() - t0:.1f}s")
        return _from_manifest(self.cache, manifest)

    # -- one layer ----------------------------------------------------------------------

    def _ensure_layer(self, key: str, step: ImageStep, progress: str) -> None:
        def make(temp: Path) -> Path:
            if isinstance(step, DebianSlim):
                root = temp / "root"
                mirror = debian_mirror()
                self.log(f"debootstrap {step.release} from {mirror} (once per release)")
                build_base(
                    step,
                    root,
                    mirror=mirror,
                    on_line=self._prefixed(progress),
                    timeout=self.step_timeout,
                )
                return root
            if isinstance(step, SnapshotLayer):  # a sandbox's writable layer, as it was
                return self._snapshot_layer(step, temp)
            stage = temp / "stage"
            stage.mkdir()
            plan = plan_step(step, stage, self.fetch_blob)
            binds = [*self.sources.binds, *plan.binds, Bind(str(stage), STAGE)]
            if plan.needs_uv:
                binds.append(Bind(str(self._ensure_uv()), TOOLS))
            for shown, script in plan.commands:
                self._run(temp, shown, script, binds, progress, step)
            return temp / "upper"

        self._with_layer(key, make)
        self.layers.append(key)

    def _snapshot_layer(self, step: SnapshotLayer, temp: Path) -> Path:
        data = self.fetch_blob(step.sha256)
        if hashlib.sha256(data).hexdigest() != step.sha256:
            raise ImageBuildError(f"snapshot layer: blob {step.sha256} does not match its sha256")
        tar = temp / "layer.tar"
        tar.write_bytes(data)
        del data
        unpack_layer(tar, temp / "root")
        return temp / "root"

    def _ensure_deps(self, key: str) -> None:
        base_key = self.keys[0]

        def make(temp: Path) -> Path:
            for shown, script in deps.deps_commands():
                self._run(temp, shown, script, self.sources.binds, "deps", None, [base_key])
            deps.keep_only_deps(temp / "upper")
            return temp / "upper"

        self._with_layer(key, make)

    def _with_layer(self, key: str, make: Callable[[Path], Path]) -> None:
        """Reuse layer ``key`` or build it with ``make(temp) -> finished root``, once."""
        short = key[:12]
        if self.cache.has_layer(key):
            self.log(f"using cached layer {short}")
            return
        on_wait = lambda: self.log(f"waiting for another build of layer {short}")
        with self.cache.lock(key, self.lock_timeout, on_wait):
            if self.cache.has_layer(key):
                self.log(f"using cached layer {short} (built by another build)")
                return
            self.cache.clear_stale_temps(key)
            temp = self.cache.new_temp(key)
            t0 = time.monotonic()
            try:
                root = make(temp)
                size = tree_size(root)
                meta = {"size": size, "created": time.time(), "image": self.image_id}
                self.cache.commit_layer(key, root, meta)
                took = time.monotonic() - t0
                self.log(f"built layer {short} in {took:.1f}s ({size / 1e6:.1f} MB)")
            finally:
                remove_tree(temp)

    def _run(
        self,
        temp: Path,
        shown: str,
        script: str,
        binds: list[Bind],
        progress: str,
        step: ImageStep | None,
        lower: list[str] | None = None,
    ) -> None:
        require_root_and_tools("unshare", "mount", "bwrap")
        self.log(f"  {progress} $ {shown}")
        env = build_env(self.env, {**self.sources.pip_env, **self.sources.uv_env})
        cwd_script = script
        if self.workdir is not None and step is not None:
            cwd_script = f"cd -- {_quote(self.workdir)} && {{ {script}\n}}"
        try:
            result = run_in_layers(
                self.cache.layers,
                self.layers if lower is None else lower,
                temp,
                cwd_script,
                env=env,
                binds=binds,
                on_line=self._prefixed(progress),
                timeout=self.step_timeout,
            )
        except ValueError as e:
            raise ImageBuildError(f"image {self.image_id}: {e}; merge some steps") from None
        if result.returncode != 0 or result.timed_out:
            what = describe_step(step) if step is not None else "strato runtime"
            raise _step_error(self.image_id, progress, what, shown, result, self.step_timeout)

    def _ensure_uv(self) -> Path:
        """uv, installed once per cache with the image's pip (``tools/uv``)."""
        target = self.cache.tools / "uv"
        if (target / "bin" / "uv").exists():
            return target.parent
        with self.cache.lock("tool-uv", self.lock_timeout):
            if (target / "bin" / "uv").exists():
                return target.parent
            self.log("installing uv for uv_pip_install (once per cache)")
            tmp_name = f"uv.tmp-{os.getpid()}"
            remove_tree(self.cache.tools / tmp_name)
            temp = self.cache.new_temp("tool-uv")
            try:
                script = f"python3 -m pip install --target {TOOLS}/{tmp_name} uv"
                binds = [*self.sources.binds, Bind(str(self.cache.tools), TOOLS, writable=True)]
                self._run(temp, "pip install uv", script, binds, "uv", None, [self.keys[0]])
                os.rename(self.cache.tools / tmp_name, target)
            finally:
                remove_tree(temp)
                remove_tree(self.cache.tools / tmp_name)
        return target.parent

    def _prefixed(self, progress: str) -> Callable[[str], None]:
        return lambda line: self.log(f"  {progress} | {line}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _step_error(
    image_id: str, progress: str, what: str, shown: str, result: RunResult, timeout: float
) -> ImageBuildError:
    how = (
        f"timed out after {timeout:.0f}s"
        if result.timed_out
        else (f"failed with exit code {result.returncode}")
    )
    tail = "\n".join(result.tail)
    return ImageBuildError(
        f"image {image_id}: step {progress} ({what}) {how}.\n"
        f"Command: {shown}\nLast {len(result.tail)} lines of output:\n{tail}",
        command=shown,
        output_tail=tail,
    )
