"""``Image``: the filesystem a function's containers run on (Modal's ``modal.Image``).

An image is an immutable chain of steps; every builder method returns a new image with
one more step. Nothing is built here: the node that first runs a container of the image
builds its layers (each cached by the hash of everything before it) and streams the
build output to the app's logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from strato import exceptions as exc
from strato import settings
from strato.protocol import images as spec_mod
from strato.protocol.images import ImageSpec


def _flatten(items) -> list[str]:
    out: list[str] = []
    for it in items:
        if isinstance(it, list | tuple):
            out.extend(_flatten(it))
        elif it is not None:
            out.append(it)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Image:
    """A container image built from declared steps, each a cached layer."""

    def __init__(self, steps: list, local_files: dict[str, str] | None = None) -> None:
        self._steps = list(steps)
        self._local_files = dict(local_files or {})  # sha256 -> local path, to upload
        self.spec = ImageSpec(self._steps)
        spec_mod.validate_spec(self.spec)

    def __repr__(self) -> str:
        return f"<strato.Image {self.object_id} ({len(self._steps)} steps)>"

    @property
    def object_id(self) -> str:
        return spec_mod.image_id(self.spec)

    @property
    def python_version(self) -> str:
        return self._steps[0].python_version

    def _then(self, step, local_files: dict[str, str] | None = None) -> Image:
        spec_mod.validate_step(step)
        return Image([*self._steps, step], {**self._local_files, **(local_files or {})})

    # ------------------------------------------------------------------ constructors

    @staticmethod
    def debian_slim(python_version: str | None = None) -> Image:
        """Debian (bookworm for Python 3.11, trixie for 3.13) with Debian's own Python."""
        return Image([spec_mod.debian_slim(python_version)])

    @staticmethod
    def from_registry(tag: str, **_kwargs) -> Image:
        raise exc.InvalidError(
            f"Image.from_registry({tag!r}) is not supported yet: this strato builds images "
            "from Debian (Image.debian_slim()) and reaches no container registry"
        )

    # ------------------------------------------------------------------ packages

    def pip_install(
        self,
        *packages,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
    ) -> Image:
        return self._installer(
            spec_mod.PipInstall,
            packages,
            find_links=find_links,
            index_url=index_url,
            extra_index_url=extra_index_url,
            pre=pre,
            extra_options=extra_options,
        )

    def uv_pip_install(
        self,
        *packages,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
    ) -> Image:
        return self._installer(
            spec_mod.UvPipInstall,
            packages,
            find_links=find_links,
            index_url=index_url,
            extra_index_url=extra_index_url,
            pre=pre,
            extra_options=extra_options,
        )

    def _installer(self, step_type, packages, **pip_opts) -> Image:
        pkgs = _flatten(packages)
        if not pkgs:
            return self
        return self._then(step_type(pkgs, spec_mod.pip_options(**pip_opts)))

    def pip_install_from_requirements(self, requirements_txt: str, **kwargs) -> Image:
        path = Path(requirements_txt).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise exc.InvalidError(f"cannot read requirements file {path}: {e}") from None
        args = spec_mod.pip_options(**kwargs)
        return self._then(spec_mod.PipInstall([], args, requirements=text))

    def apt_install(self, *packages) -> Image:
        pkgs = _flatten(packages)
        return self._then(spec_mod.AptInstall(pkgs)) if pkgs else self

    def run_commands(self, *commands) -> Image:
        cmds = _flatten(commands)
        return self._then(spec_mod.RunCommands(cmds)) if cmds else self

    def run_function(self, fn) -> Image:
        """Run ``fn()`` with the image's Python at build time (e.g. to download weights)."""
        import cloudpickle

        if not callable(fn):
            raise exc.InvalidError(f"run_function needs a function, not {fn!r}")
        module = inspect.getmodule(fn)
        if module is not None and module.__name__ not in ("builtins",):
            with contextlib.suppress(Exception):
                cloudpickle.register_pickle_by_value(module)
        try:
            pickled = cloudpickle.dumps(fn)
        except Exception as e:
            raise exc.SerializationError(f"cannot pickle {fn!r} for run_function: {e}") from None
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = ""
        fingerprint = hashlib.sha256(source.encode()).hexdigest() if source else ""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self._then(
            spec_mod.RunFunction(pickled, getattr(fn, "__qualname__", "fn"), fingerprint, version)
        )

    # ------------------------------------------------------------------ environment

    def env(self, vars: dict[str, str]) -> Image:  # noqa: A002 - Modal's name
        if not isinstance(vars, dict):
            raise exc.InvalidError("Image.env() takes a dict of str to str")
        return self._then(spec_mod.Env(dict(vars)))

    def workdir(self, path: str) -> Image:
        return self._then(spec_mod.Workdir(str(path)))

    # ------------------------------------------------------------------ local files

    def add_local_file(
        self, local_path: str | Path, remote_path: str, *, copy: bool = False
    ) -> Image:
        path = Path(local_path).expanduser()
        if not path.is_file():
            raise exc.InvalidError(f"add_local_file: no such file {path}")
        if remote_path.endswith("/"):
            remote_path = remote_path + path.name
        sha = _sha256(path)
        return self._then(
            spec_mod.AddFiles([(remote_path, sha, path.stat().st_mode & 0o777)]), {sha: str(path)}
        )

    def add_local_dir(
        self,
        local_path: str | Path,
        remote_path: str,
        *,
        copy: bool = False,
        ignore: list[str] | None = None,
    ) -> Image:
        root = Path(local_path).expanduser()
        if not root.is_dir():
            raise exc.InvalidError(f"add_local_dir: no such directory {root}")
        patterns = list(ignore or [])
        files, local = [], {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if not path.is_file() or any(path.match(p) or Path(rel).match(p) for p in patterns):
                continue
            sha = _sha256(path)
            files.append((f"{remote_path.rstrip('/')}/{rel}", sha, path.stat().st_mode & 0o777))
            local[sha] = str(path)
        if not files:
            return self
        return self._then(spec_mod.AddFiles(files), local)

    def add_local_python_source(self, *modules: str, copy: bool = False) -> Image:
        """Copy local Python modules or packages into the image's import path."""
        image = self
        for name in modules:
            found = importlib.util.find_spec(name)
            if found is None or not found.origin:
                raise exc.InvalidError(f"add_local_python_source: module {name!r} not found")
            origin = Path(found.origin)
            if found.submodule_search_locations:
                image = image.add_local_dir(
                    origin.parent, f"/root/{name}", ignore=["__pycache__", "*.pyc"]
                )
            else:
                image = image.add_local_file(origin, f"/root/{origin.name}")
        return image

    # ------------------------------------------------------------------ imports

    @contextlib.contextmanager
    def imports(self):
        """``with image.imports(): import torch``: imports that exist only in the image.
        Here (outside a container) an ImportError is swallowed; in the container the
        imports run for real."""
        if settings.IN_CONTAINER.get():
            yield
            return
        try:
            yield
        except ImportError:
            pass


def upload_image_files(client, image: Image) -> int:
    """Upload the image's local files that the control plane does not have yet."""
    from strato.protocol import messages as m

    if not image._local_files:
        return 0
    shas = list(image._local_files)
    missing = client.call("POST", "/blobs/check", m.BlobCheck(shas), m.MissingBlobs).missing
    for sha in missing:
        client.put_blob(sha, Path(image._local_files[sha]).read_bytes())
    return len(missing)
