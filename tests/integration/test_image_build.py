"""Image builds for real: debootstrap, overlay layers, bwrap, pip and apt from the mirrors.

The base layer (debootstrap, ~1-2 min) is built once into a fixed cache,
``/tmp/strato-test-image-cache`` (``STRATO_TEST_IMAGE_CACHE`` overrides), so reruns on one
machine reuse it; every test that checks a *fresh* build makes a layer nobody built before
(a unique marker in its command).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest

from strato.exceptions import NotFoundError
from strato.images import (
    BuiltImage,
    ImageBuildError,
    build,
    list_images,
    prune,
    remove_image,
    run_in_image,
)
from strato.images.cache import BuildCache
from strato.protocol import images as pi

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CACHE = Path(os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache"))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "image builds need root"
    missing = [t for t in ("bwrap", "debootstrap", "unshare", "mount") if not shutil.which(t)]
    return f"image builds need {', '.join(missing)}" if missing else None


if (_why := _missing()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))


class Log:
    """A thread-safe ``log`` callback that keeps every line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def no_blobs(sha: str) -> bytes:
    raise AssertionError(f"unexpected blob fetch {sha}")


def base_spec(*steps: pi.ImageStep) -> pi.ImageSpec:
    return pi.ImageSpec([pi.debian_slim("3.11"), *steps])


def do_build(spec: pi.ImageSpec, log: Callable[[str], None] | None = None, **kw) -> BuiltImage:
    return build(spec, CACHE, fetch_blob=kw.pop("fetch_blob", no_blobs), log=log or Log(), **kw)


def sh(image: BuiltImage, script: str, **kw) -> subprocess.CompletedProcess[str]:
    result = run_in_image(image, ["/bin/sh", "-c", script], **kw)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def forget() -> Iterator[Callable[[BuiltImage], BuiltImage]]:
    """Register a one-off image; it is removed from the shared cache after the test."""
    made: list[str] = []

    def register(image: BuiltImage) -> BuiltImage:
        made.append(image.image_id)
        return image

    yield register
    for image_id in made:
        with contextlib.suppress(NotFoundError):
            remove_image(CACHE, image_id)


@pytest.fixture(scope="session")
def debian_slim() -> BuiltImage:
    """debian_slim("3.11"), built once per machine (the cache outlives the session)."""
    log = Log()
    t0 = time.monotonic()
    image = do_build(base_spec(), log)
    print(f"debian_slim: {time.monotonic() - t0:.1f}s")
    return image


def test_debian_slim_is_debian_with_its_python(debian_slim: BuiltImage):
    assert debian_slim.python == "/usr/bin/python3"
    assert debian_slim.python_version == "3.11"
    assert all(Path(p).is_dir() for p in debian_slim.layers)
    out = sh(debian_slim, "cat /etc/os-release; python --version; python3 --version").stdout
    assert "ID=debian" in out and "bookworm" in out
    assert out.count("Python 3.11.") == 2
    # strato's runtime dependencies are there, for the image's python, without the user
    code = "import msgspec, cloudpickle; print(msgspec.__version__, cloudpickle.__version__)"
    out = sh(debian_slim, f'python3 -c "{code}"', env={"PYTHONPATH": debian_slim.strato_deps})
    assert out.stdout.split() == [
        importlib.metadata.version("msgspec"),
        importlib.metadata.version("cloudpickle"),
    ]


def test_pip_install_env_and_workdir(debian_slim: BuiltImage, forget):
    assert importlib.util.find_spec("humanize") is None, "pick a package the host lacks"
    marker = pi.Env({"TEST_MARKER": uuid.uuid4().hex})  # a fresh pip layer every run
    spec = base_spec(
        marker,
        pi.PipInstall(["humanize"]),
        pi.Env({"GREETING": "hi there"}),
        pi.Workdir("/srv/app"),
    )
    log = Log()
    image = forget(do_build(spec, log))
    assert image.image_id == pi.image_id(spec)
    assert image.workdir == "/srv/app" and image.env["GREETING"] == "hi there"
    assert image.layers[0] == debian_slim.layers[0] and image.layers[-1] == debian_slim.layers[-1]
    # base, pip_install, workdir, deps (env makes no layer)
    assert len(image.layers) == 4
    assert log.count("step 3/5 pip_install humanize") == 1
    assert log.count("$ python -m pip install humanize") == 1
    assert log.count(f"using cached layer {pi.layer_keys(spec)[0][:12]}") == 1
    out = sh(
        image,
        'python -c "import humanize; print(humanize.intcomma(1234567))"; echo "$GREETING"; pwd',
    ).stdout.split("\n")
    assert out[:3] == ["1,234,567", "hi there", "/srv/app"]
    assert image.env["TEST_MARKER"] == marker.vars["TEST_MARKER"]
    # the base image is untouched by the layer above it
    assert run_in_image(debian_slim, ["python3", "-c", "import humanize"]).returncode != 0


def test_failed_step_reports_command_and_output_and_leaves_no_layer(debian_slim: BuiltImage):
    marker = uuid.uuid4().hex[:8]
    cmd = f"for i in $(seq 1 40); do echo {marker}-line-$i; done; echo oops >&2; exit 3"
    spec = base_spec(pi.RunCommands([f"echo ok-{marker}", cmd]))
    failed_key = pi.layer_keys(spec)[-1]
    with pytest.raises(ImageBuildError) as e:
        do_build(spec)
    message = str(e.value)
    assert cmd in message and e.value.command == cmd
    assert "exit code 3" in message and "step 2/2" in message
    assert f"{marker}-line-40" in message and "oops" in message
    assert f"{marker}-line-10\n" not in message  # only the end of the output
    layers = CACHE / "layers"
    assert not any(p.name.startswith(failed_key) for p in layers.iterdir())
    assert not (CACHE / "images" / f"{pi.image_id(spec)}.json").exists()


def test_rebuild_of_a_cached_image_is_fast_and_offline(debian_slim, monkeypatch):
    spec = base_spec(
        pi.PipInstall(["humanize"]), pi.Env({"GREETING": "hi there"}), pi.Workdir("/srv/app")
    )
    first = do_build(spec)

    def forbidden(*a, **k):
        raise AssertionError("a cached rebuild must not start processes or use the network")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, forbidden)
    monkeypatch.setattr(os, "fork", forbidden)
    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    log = Log()
    t0 = time.perf_counter()
    again = do_build(spec, log)
    took = time.perf_counter() - t0
    assert again == first
    assert took < 0.1, f"cached rebuild took {took * 1000:.0f} ms"
    assert log.lines == [f"using cached image {first.image_id}"]


def test_concurrent_builds_build_a_layer_once(debian_slim: BuiltImage, forget):
    marker = uuid.uuid4().hex[:8]
    spec = base_spec(pi.RunCommands([f"echo built-{marker} >> /built-count; sleep 1"]))
    logs = [Log(), Log()]
    results: list[BuiltImage | BaseException] = [None, None]  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            results[i] = do_build(spec, logs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(isinstance(r, BuiltImage) for r in results), results
    assert results[0] == results[1]
    forget(results[0])
    runs = sum(log.count(f"$ echo built-{marker}") for log in logs)
    assert runs == 1, "\n---\n".join(map(str, logs))
    assert sum(log.count("built by another build") for log in logs) == 1
    assert sh(results[0], "cat /built-count").stdout == f"built-{marker}\n"


def test_add_files_and_run_function(debian_slim: BuiltImage, forget):
    blobs = {}

    def blob(data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        blobs[sha] = data
        return sha

    marker = uuid.uuid4().hex[:8]
    mod = blob(f"VALUE = {marker!r}\n".encode())
    script = blob(b"#!/bin/sh\necho script-ran\n")
    files = [("/opt/app/pkg/mod.py", mod, 0o644), ("/usr/local/bin/hello", script, 0o755)]

    def setup() -> None:  # runs inside the image, at build time
        import sys

        sys.path.insert(0, "/opt/app")
        import pkg.mod

        with open("/etc/setup-ran", "w") as f:
            f.write(f"{pkg.mod.VALUE} {sys.version_info[0]}.{sys.version_info[1]}")

    fn = pi.RunFunction(pickled=cloudpickle.dumps(setup), name="setup", python_version="3.11")
    spec = base_spec(pi.AddFiles(files), fn)
    image = forget(do_build(spec, fetch_blob=blobs.__getitem__))
    out = sh(
        image,
        "hello; cat /etc/setup-ran; echo; stat -c %a /opt/app/pkg/mod.py; "
        "test -L /bin && echo bin-still-a-symlink",
    ).stdout.split("\n")
    assert out[:4] == ["script-ran", f"{marker} 3.11", "644", "bin-still-a-symlink"]


def test_apt_install(debian_slim: BuiltImage):
    image = do_build(base_spec(pi.AptInstall(["jq"])))
    assert sh(image, "echo '{\"a\": 7}' | jq .a").stdout.strip() == "7"
    # the package indexes are not kept in the layer
    assert sh(image, "ls /var/lib/apt/lists | grep -c Packages || true").stdout.strip() == "0"


def test_uv_pip_install(debian_slim: BuiltImage):
    assert importlib.util.find_spec("tomli_w") is None, "pick a package the host lacks"
    image = do_build(base_spec(pi.UvPipInstall(["tomli-w"])))
    out = sh(image, "python -c 'import tomli_w; print(tomli_w.dumps({\"a\": 1}))'").stdout
    assert out.strip() == "a = 1"


def test_list_remove_and_prune(debian_slim: BuiltImage, tmp_path: Path):
    marker = uuid.uuid4().hex[:8]
    spec = base_spec(pi.RunCommands([f"echo {marker} > /marker"]))
    image = do_build(spec)
    listed = {i.image_id: i for i in list_images(CACHE)}
    assert image.image_id in listed and debian_slim.image_id in listed
    assert listed[image.image_id].size_bytes > listed[debian_slim.image_id].size_bytes
    own_layer = image.layers[1]
    freed = remove_image(CACHE, image.image_id)
    assert freed > 0 and not Path(own_layer).exists()
    assert all(Path(p).is_dir() for p in debian_slim.layers)  # shared layers stay
    assert image.image_id not in {i.image_id for i in list_images(CACHE)}

    # prune: an orphan layer (its image forgotten) goes, kept images stay
    orphan = do_build(base_spec(pi.RunCommands([f"echo orphan-{marker} > /o"])))
    (CACHE / "images" / f"{orphan.image_id}.json").unlink()
    keep = {i.image_id for i in list_images(CACHE)}
    assert prune(CACHE, keep, min_age_s=0) > 0
    assert not Path(orphan.layers[1]).exists()
    assert all(Path(p).is_dir() for p in debian_slim.layers)
    assert {i.image_id for i in list_images(CACHE)} == keep
    assert BuildCache(CACHE).has_layer(pi.layer_keys(base_spec())[0])


def test_step_timeout_kills_the_step_and_leaves_no_layer(debian_slim: BuiltImage):
    marker = uuid.uuid4().hex[:8]
    spec = base_spec(pi.RunCommands([f"echo start-{marker}; sleep 60"]))
    t0 = time.monotonic()
    with pytest.raises(ImageBuildError, match="timed out after 1s") as e:
        do_build(spec, step_timeout=1)
    assert time.monotonic() - t0 < 20
    assert f"start-{marker}" in e.value.output_tail
    key = pi.layer_keys(spec)[-1]
    assert not any(p.name.startswith(key) for p in (CACHE / "layers").iterdir())


def test_failed_debootstrap_leaves_no_base_layer(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("STRATO_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    log = Log()
    with pytest.raises(ImageBuildError, match="debootstrap") as e:
        build(base_spec(), tmp_path, fetch_blob=no_blobs, log=log)
    assert "127.0.0.1:9" in str(e.value)
    assert list((tmp_path / "layers").iterdir()) == []
    assert list((tmp_path / "images").iterdir()) == []
    assert log.count("step 1/1 debian_slim bookworm") == 1
