"""Image specs: the steps that make an image, their layer keys and their validation.

An :class:`ImageSpec` is a list of steps; the first is the base (:class:`DebianSlim`).
Each step has a *layer key*: the sha256 of the previous step's key and a canonical
encoding of the step, so a step's key names everything before it. The image id is
``"im-"`` + the first 32 hex digits of the last key.

Local files (``add_local_file``/``add_local_dir``/``add_local_python_source``) become
:class:`AddFiles` steps that name content-addressed blobs the client uploads.
"""

from __future__ import annotations

import posixpath
import re
import sys
from typing import Any

import msgspec

from strato.exceptions import InvalidError

KEY_VERSION = "strato-image-v1"
"""Mixed into the first key: bump it to invalidate every cached layer."""

DEBIAN_PYTHONS: dict[str, str] = {"3.11": "bookworm", "3.13": "trixie"}
"""The Python of each Debian release's own ``python3`` package (version -> release)."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _Step(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="type"):
    """Base of the step structs; the tag names the step on the wire and in keys."""


class DebianSlim(_Step, frozen=True, tag="debian_slim"):
    """A Debian root filesystem (debootstrap minbase) with Debian's own ``python3``."""

    release: str
    python_version: str


class PipInstall(_Step, frozen=True, tag="pip_install"):
    """``python -m pip install`` of requirement specifiers (and/or a requirements file)."""

    packages: list[str]
    extra_args: list[str] = []
    requirements: str = ""
    """The text of a requirements file (``pip_install_from_requirements``), if any."""


class UvPipInstall(_Step, frozen=True, tag="uv_pip_install"):
    """``uv pip install --system`` of requirement specifiers (and/or a requirements file)."""

    packages: list[str]
    extra_args: list[str] = []
    requirements: str = ""


class AptInstall(_Step, frozen=True, tag="apt_install"):
    """``apt-get install`` of Debian packages."""

    packages: list[str]
    extra_args: list[str] = []


class RunCommands(_Step, frozen=True, tag="run_commands"):
    """Shell commands (``/bin/sh -c``), run in order; the first failure stops the build."""

    commands: list[str]


class RunFunction(_Step, frozen=True, tag="run_function"):
    """A cloudpickled zero-argument function, called with the image's Python at build time."""

    pickled: bytes
    name: str
    fingerprint: str = ""
    """If set, the layer key uses it instead of the pickle bytes (e.g. a hash of the
    function's source and globals), so that a pickle that differs from run to run does
    not rebuild the layer."""
    python_version: str = ""
    """The major.minor of the Python that pickled it; must be the image's, if set."""


class Env(_Step, frozen=True, tag="env"):
    """Environment variables for later steps and for the containers (no layer)."""

    vars: dict[str, str]


class Workdir(_Step, frozen=True, tag="workdir"):
    """The working directory of later steps and of the containers (created if missing)."""

    path: str


class AddFiles(_Step, frozen=True, tag="add_files"):
    """Local files copied in: ``(dest_path, sha256, mode)``; contents are blobs by sha256."""

    files: list[tuple[str, str, int]]


class SnapshotLayer(_Step, frozen=True, tag="snapshot_layer"):
    """A sandbox's writable layer (``sb.snapshot_filesystem()``): a tar of an overlay
    upper directory, whiteouts included, stored as the blob ``sha256``."""

    sha256: str
    size: int


ImageStep = (
    DebianSlim
    | PipInstall
    | UvPipInstall
    | AptInstall
    | RunCommands
    | RunFunction
    | Env
    | Workdir
    | AddFiles
    | SnapshotLayer
)

METADATA_STEPS: tuple[type, ...] = (Env,)
"""Steps that change no file: they make no layer (but still change later keys)."""


class ImageSpec(msgspec.Struct, frozen=True):
    """An image: its steps, base first."""

    steps: list[ImageStep]


# ---------------------------------------------------------------------------------------
# keys


def _canonical(value: Any) -> Any:
    """Builtins with every dict turned into a key-sorted list of pairs."""
    if isinstance(value, dict):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def step_encoding(step: ImageStep) -> bytes:
    """The canonical bytes of one step, as hashed into its key."""
    if isinstance(step, RunFunction) and step.fingerprint:
        step = msgspec.structs.replace(step, pickled=b"")
    if isinstance(step, AddFiles):
        step = AddFiles(files=sorted(step.files))
    return msgspec.msgpack.encode(_canonical(msgspec.to_builtins(step)))


def layer_keys(spec: ImageSpec) -> list[str]:
    """The key of every step: sha256(previous key, canonical encoding of the step)."""
    import hashlib  # (here: a sandbox agent imports this module, and never needs it)

    keys: list[str] = []
    previous = KEY_VERSION.encode()
    for step in spec.steps:
        h = hashlib.sha256()
        h.update(len(previous).to_bytes(4, "big"))
        h.update(previous)
        h.update(step_encoding(step))
        key = h.hexdigest()
        keys.append(key)
        previous = key.encode()
    return keys


def image_id(spec: ImageSpec) -> str:
    """``"im-"`` + the first 32 hex digits of the last step's key."""
    keys = layer_keys(spec)
    if not keys:
        raise InvalidError("an image needs a base step (Image.debian_slim())")
    return "im-" + keys[-1][:32]


def describe_step(step: ImageStep, width: int = 100) -> str:
    """A one-line human description, e.g. ``"pip_install numpy==2.1.3"``."""
    tag = str(type(step).__struct_config__.tag)
    match step:
        case DebianSlim():
            text = f"{tag} {step.release} python {step.python_version}"
        case PipInstall() | UvPipInstall():
            req = ["-r requirements.txt"] if step.requirements else []
            text = " ".join([tag, *step.packages, *req, *step.extra_args])
        case AptInstall():
            text = " ".join([tag, *step.packages, *step.extra_args])
        case RunCommands():
            text = f"{tag} " + " && ".join(step.commands)
        case RunFunction():
            text = f"{tag} {step.name}"
        case Env():
            text = f"{tag} " + " ".join(f"{k}=..." for k in sorted(step.vars))
        case Workdir():
            text = f"{tag} {step.path}"
        case SnapshotLayer():
            text = f"{tag} {step.sha256[:12]} ({step.size} bytes)"
        case AddFiles():
            text = f"{tag} {len(step.files)} file(s)"
            if len(step.files) == 1:
                text = f"{tag} {step.files[0][0]}"
        case _:
            text = str(tag)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------
# Python versions


def available_pythons() -> str:
    """``"3.11 (bookworm), 3.13 (trixie)"``."""
    return ", ".join(f"{v} ({r})" for v, r in DEBIAN_PYTHONS.items())


def client_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def debian_release_for(python_version: str | None = None) -> tuple[str, str]:
    """``(release, python_version)`` for ``debian_slim(python_version)``; ``None`` means
    this interpreter's major.minor. An unavailable version is an :class:`InvalidError`."""
    requested = python_version
    version = client_python_version() if python_version is None else str(python_version).strip()
    release = DEBIAN_PYTHONS.get(version)
    if release is None:
        which = (
            f"this Python ({version}, the default of debian_slim())"
            if requested is None
            else f"python_version={requested!r}"
        )
        raise InvalidError(
            f"Image.debian_slim: {which} is not available. Available (Debian's own python3): "
            f"{available_pythons()}. Pass python_version= one of those (major.minor)."
        )
    return release, version


def debian_slim(python_version: str | None = None) -> DebianSlim:
    """The base step of ``Image.debian_slim(python_version)``."""
    release, version = debian_release_for(python_version)
    return DebianSlim(release=release, python_version=version)


def pip_options(
    *,
    find_links: str | None = None,
    index_url: str | None = None,
    extra_index_url: str | None = None,
    pre: bool = False,
    extra_options: str = "",
) -> list[str]:
    """``extra_args`` for Modal's ``pip_install(..., find_links=, index_url=,
    extra_index_url=, pre=, extra_options=)`` (the same for ``uv_pip_install``)."""
    args: list[str] = []
    if find_links:
        args += ["--find-links", find_links]
    if index_url:
        args += ["--index-url", index_url]
    if extra_index_url:
        args += ["--extra-index-url", extra_index_url]
    if pre:
        args.append("--pre")
    import shlex  # (here, as hashlib above)

    return args + shlex.split(extra_options)


# ---------------------------------------------------------------------------------------
# validation

_PIP_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_PIP_AFTER_NAME = ("[", "=", "<", ">", "!", "~", ";", "@", " ", "(")
_APT_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*(?::[a-z0-9-]+)?(?:=[A-Za-z0-9.+~:-]+|/[A-Za-z0-9.-]+)?")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RELEASE_RE = re.compile(r"[a-z][a-z0-9-]*")
_VERSION_RE = re.compile(r"3\.\d+")


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidError(f"{what} {value!r} contains a NUL byte")
    return value


def validate_pip_requirement(req: str, method: str = "pip_install") -> None:
    """A requirement specifier (``numpy``, ``numpy==2.1.3``, ``pkg[extra]>=1``,
    ``pkg @ https://...``, ``git+https://...``); options belong in ``extra_args``."""
    _check_text(f"{method} package", req)
    text = req.strip()
    if not text:
        raise InvalidError(f"{method}: a package name is empty")
    if "\n" in text or "\r" in text:
        raise InvalidError(f"{method}: package {req!r} contains a line break; pass one per arg")
    if text.startswith("-"):
        raise InvalidError(
            f"{method}: {req!r} is an option, not a package; pass options with extra_options= "
            "(or index_url=/find_links=/pre=)"
        )
    if "://" in text or text.startswith(("git+", "hg+", "svn+", "bzr+")):
        return
    m = _PIP_NAME_RE.match(text)
    rest = text[m.end() :] if m is not None else None
    if rest is None or (rest and not rest.startswith(_PIP_AFTER_NAME)):
        raise InvalidError(
            f"{method}: {req!r} is not a valid requirement; expected a name such as 'numpy', "
            "optionally with extras and a version ('numpy==2.1.3', 'pkg[extra]>=1')"
        )


def validate_apt_package(name: str) -> None:
    """A Debian package name, optionally ``=version``, ``/release`` or ``:arch``."""
    _check_text("apt_install package", name)
    if not _APT_RE.fullmatch(name):
        raise InvalidError(
            f"apt_install: {name!r} is not a valid Debian package name (lowercase letters, "
            "digits and '+-.', optionally '=version'); pass options with extra_args"
        )


def validate_env_name(name: str) -> None:
    _check_text("env name", name)
    if not _ENV_NAME_RE.fullmatch(name):
        raise InvalidError(
            f"env: {name!r} is not a valid environment variable name "
            "(letters, digits and '_', not starting with a digit)"
        )


def validate_abs_path(path: str, what: str) -> str:
    """An absolute, normalised posix path other than ``/``; returns it normalised."""
    _check_text(what, path)
    if not path.startswith("/"):
        raise InvalidError(f"{what} {path!r} must be an absolute path (start with '/')")
    if ".." in path.split("/"):
        raise InvalidError(f"{what} {path!r} must not contain '..'")
    return posixpath.normpath(path)


def _validate_args(args: list[str], what: str) -> None:
    for a in args:
        _check_text(what, a)


def validate_step(step: ImageStep) -> None:
    """Raise :class:`InvalidError` if a step cannot be built."""
    match step:
        case DebianSlim():
            if not _RELEASE_RE.fullmatch(step.release) or not _VERSION_RE.fullmatch(
                step.python_version
            ):
                raise InvalidError(f"debian_slim: bad release/python {step!r}")
            if DEBIAN_PYTHONS.get(step.python_version) != step.release:
                raise InvalidError(
                    f"debian_slim: Debian {step.release} does not give Python "
                    f"{step.python_version}. Available: {available_pythons()}"
                )
        case PipInstall() | UvPipInstall():
            tag = str(type(step).__struct_config__.tag)
            _check_text(f"{tag} requirements", step.requirements)
            if not step.packages and not step.requirements.strip():
                raise InvalidError(f"{tag}: no packages given")
            for p in step.packages:
                validate_pip_requirement(p, str(tag))
            _validate_args(step.extra_args, f"{tag} option")
        case AptInstall():
            if not step.packages:
                raise InvalidError("apt_install: no packages given")
            for p in step.packages:
                validate_apt_package(p)
            _validate_args(step.extra_args, "apt_install option")
        case RunCommands():
            if not step.commands:
                raise InvalidError("run_commands: no commands given")
            for c in step.commands:
                _check_text("run_commands command", c)
                if not c.strip():
                    raise InvalidError("run_commands: a command is empty")
        case SnapshotLayer():
            if not _SHA256_RE.fullmatch(step.sha256) or step.size < 0:
                raise InvalidError(f"snapshot_layer: bad blob {step.sha256!r}")
        case RunFunction():
            if not step.pickled:
                raise InvalidError("run_function: the function's pickle is empty")
            if not step.name:
                raise InvalidError("run_function: the function has no name")
        case Env():
            for k, v in step.vars.items():
                validate_env_name(k)
                _check_text(f"env {k}", v)
        case Workdir():
            validate_abs_path(step.path, "workdir")
        case AddFiles():
            if not step.files:
                raise InvalidError("add_local_*: no files to add")
            seen: set[str] = set()
            for dest, sha, mode in step.files:
                norm = validate_abs_path(dest, "add_local_* destination")
                if norm == "/":
                    raise InvalidError("add_local_*: a file cannot be copied to '/'")
                if norm in seen:
                    raise InvalidError(f"add_local_*: two files go to {norm!r}")
                seen.add(norm)
                if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
                    raise InvalidError(f"add_local_*: {sha!r} is not a sha256 hex digest")
                if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                    raise InvalidError(f"add_local_*: bad file mode {mode!r} for {dest!r}")
        case _:
            raise InvalidError(f"unknown image step {step!r}")


def validate_spec(spec: ImageSpec) -> None:
    """Raise :class:`InvalidError` unless the spec is one base step and buildable steps."""
    if not spec.steps or not isinstance(spec.steps[0], DebianSlim):
        raise InvalidError("an image must start with Image.debian_slim()")
    base = spec.steps[0]
    for i, step in enumerate(spec.steps):
        if i and isinstance(step, DebianSlim):
            raise InvalidError("debian_slim() can only be the first step of an image")
        validate_step(step)
        if (
            isinstance(step, RunFunction)
            and step.python_version
            and step.python_version != base.python_version
        ):
            raise InvalidError(
                f"run_function({step.name}): it was pickled by Python {step.python_version} "
                f"but the image has Python {base.python_version}; build the image with "
                f"debian_slim(python_version={step.python_version!r}) or run from a client "
                f"with Python {base.python_version}"
            )
