"""What each image step runs: shell commands inside the sandbox, plus files staged for it.

A :class:`StepPlan` lists ``(shown, script)`` commands: ``shown`` is what the user reads in
progress lines and errors, ``script`` what ``/bin/sh -c`` runs. Files a step needs (a
requirements file, a pickled function, blobs to copy) are staged on the host in a
directory bound read-only at :data:`STAGE` inside the sandbox.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from strato.images.errors import ImageBuildError
from strato.images.hostconf import Bind
from strato.protocol.images import (
    DEFAULT_PATH,
    AddFiles,
    AptInstall,
    ImageStep,
    PipInstall,
    RunCommands,
    RunFunction,
    UvPipInstall,
    Workdir,
)

STAGE = "/tmp/.strato-step"
HOST_PY = "/tmp/.strato-py"
TOOLS = "/tmp/.strato-tools"
UV = f"{TOOLS}/uv/bin/uv"
PYTHON = "python3"


@dataclass
class StepPlan:
    commands: list[tuple[str, str]]
    """``(shown, script)`` pairs, run in order in one layer."""
    binds: list[Bind] = field(default_factory=list)
    needs_uv: bool = False


def _pip_like(step: PipInstall | UvPipInstall, stage: Path) -> StepPlan:
    args = list(step.packages)
    if step.requirements:
        (stage / "requirements.txt").write_text(step.requirements)
        args += ["-r", f"{STAGE}/requirements.txt"]
    args += step.extra_args
    if isinstance(step, PipInstall):
        shown = shlex.join(["python", "-m", "pip", "install", *args])
        script = shlex.join([PYTHON, "-m", "pip", "install", *args])
        return StepPlan([(shown, script)])
    shown = shlex.join(["uv", "pip", "install", "--system", *args])
    script = shlex.join(
        [UV, "pip", "install", "--system", "--break-system-packages", "--python", PYTHON, *args]
    )
    return StepPlan([(shown, script)], needs_uv=True)


def _apt(step: AptInstall) -> StepPlan:
    install = shlex.join(["apt-get", "install", "-y", *step.extra_args, *step.packages])
    return StepPlan(
        [
            ("apt-get update", "apt-get update"),
            (install, install),
            ("apt-get clean", "apt-get clean && rm -rf /var/lib/apt/lists/*"),
        ]
    )


def host_cloudpickle_dir() -> str:
    """The directory of the host's ``cloudpickle`` package (pure Python)."""
    spec = importlib.util.find_spec("cloudpickle")
    if spec is None or not spec.submodule_search_locations:
        raise ImageBuildError("run_function needs cloudpickle installed on the builder")
    return list(spec.submodule_search_locations)[0]


_RUN_FUNCTION = (
    "import sys; sys.path.insert(0, {py!r}); import cloudpickle; "
    "f = cloudpickle.loads(open({pkl!r}, 'rb').read()); f()"
)

_COPY_FILES = """
import json, os, shutil
for dest, sha, mode in json.load(open({manifest!r})):
    os.makedirs(os.path.dirname(dest) or '/', exist_ok=True)
    tmp = dest + '.strato-tmp'
    shutil.copyfile({blobs!r} + '/' + sha, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
"""


def _run_function(step: RunFunction, stage: Path) -> StepPlan:
    (stage / "function.pkl").write_bytes(step.pickled)
    script = _RUN_FUNCTION.format(py=HOST_PY, pkl=f"{STAGE}/function.pkl")
    bind = Bind(host_cloudpickle_dir(), f"{HOST_PY}/cloudpickle")
    return StepPlan([(f"run_function {step.name}", shlex.join([PYTHON, "-c", script]))], [bind])


def _add_files(step: AddFiles, stage: Path, fetch_blob: Callable[[str], bytes]) -> StepPlan:
    blobs = stage / "blobs"
    blobs.mkdir(exist_ok=True)
    for _dest, sha, _mode in step.files:
        target = blobs / sha
        if target.exists():
            continue
        data = fetch_blob(sha)
        if hashlib.sha256(data).hexdigest() != sha:
            raise ImageBuildError(f"add_local_*: blob {sha} does not match its sha256")
        target.write_bytes(data)
    files = [(os.path.normpath(d), sha, mode) for d, sha, mode in step.files]
    (stage / "files.json").write_text(json.dumps(files))
    script = _COPY_FILES.format(manifest=f"{STAGE}/files.json", blobs=f"{STAGE}/blobs")
    dests = ", ".join(d for d, _, _ in files[:3]) + (", ..." if len(files) > 3 else "")
    return StepPlan([(f"copy {len(files)} file(s) to {dests}", shlex.join([PYTHON, "-c", script]))])


def plan_step(step: ImageStep, stage: Path, fetch_blob: Callable[[str], bytes]) -> StepPlan:
    """The commands of a layer-making step; files it needs are written under ``stage``."""
    match step:
        case PipInstall() | UvPipInstall():
            return _pip_like(step, stage)
        case AptInstall():
            return _apt(step)
        case RunCommands():
            return StepPlan([(c, c) for c in step.commands])
        case RunFunction():
            return _run_function(step, stage)
        case Workdir():
            cmd = shlex.join(["mkdir", "-p", "--", os.path.normpath(step.path)])
            return StepPlan([(cmd, cmd)])
        case AddFiles():
            return _add_files(step, stage, fetch_blob)
    raise ImageBuildError(f"no layer to build for step {step!r}")


def build_env(user_env: dict[str, str], sources_env: dict[str, str]) -> dict[str, str]:
    """The environment of build commands: sane defaults, the host's package sources, then
    the image's own ``env()`` (which wins)."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "UV_NO_CACHE": "1",
    }
    env.update(sources_env)
    env.update(user_env)
    return env
