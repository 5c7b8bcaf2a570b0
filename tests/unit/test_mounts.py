"""Automount: collecting the user's local files, the manifest, and materialising it."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

import strato.protocol.mounts
from strato.client import mounts as client_mounts
from strato.client.mounts import LocalMount, collect_local_mount
from strato.exceptions import InvalidError
from strato.protocol.mounts import (
    MountFile,
    MountManifest,
    decode_manifest,
    encode_manifest,
    mount_id,
    validate_manifest,
)
from strato.worker import mounts as worker_mounts
from strato.worker.mounts import materialize

SHIPPED = [
    "hello.py",
    "helper.py",
    "mypkg/__init__.py",
    "mypkg/core.py",
    "mypkg/data.json",
    "mypkg/sub/__init__.py",
    "mypkg/sub/deep.py",
    "mypkg/tool.py",
]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    _write(
        proj / "hello.py",
        """
        import json
        import sys

        import msgspec  # site-packages
        import helper
        import mypkg.sub.deep
        import strato.protocol.mounts

        from strato.client.mounts import collect_local_mount

        if __name__ == "__main__":
            m = collect_local_mount()
            print(json.dumps({
                "roots": [[f.path for f in root] for root in m.manifest.roots],
                "main": m.main_module_name,
                "files": sorted(m.files.values()),
            }))
        """,
    )
    _write(proj / "helper.py", "VALUE = 'helper'\n")
    _write(proj / "unused.py", "raise RuntimeError('never shipped')\n")
    _write(proj / "mypkg/__init__.py", "")
    _write(proj / "mypkg/core.py", "CORE = 'core'\n")
    _write(proj / "mypkg/sub/__init__.py", "")
    _write(proj / "mypkg/sub/deep.py", "from mypkg.core import CORE\nDEEP = CORE + '-deep'\n")
    _write(proj / "mypkg/data.json", '{"x": 1}\n')
    _write(proj / "mypkg/__pycache__/core.cpython-311.pyc", "junk")
    _write(proj / "mypkg/.hidden/secret.py", "SECRET = 1\n")
    _write(proj / "mypkg/node_modules/x.js", "x\n")
    _write(proj / "mypkg/.env", "TOKEN=1\n")
    (proj / "mypkg/big.bin").write_bytes(b"\0" * (1024 * 1024 + 1))
    tool = _write(proj / "mypkg/tool.py", "#!/usr/bin/env python\n")
    tool.chmod(0o755)
    return proj


def _module(name: str, file: Path | None, *, script: bool = False) -> ModuleType:
    module = ModuleType(name)
    if file is not None:
        module.__file__ = str(file)
        if file.name == "__init__.py":
            module.__path__ = [str(file.parent)]
    if script:
        module.__spec__ = None
    else:
        module.__spec__ = importlib.machinery.ModuleSpec(
            name, None, origin=str(file) if file else None
        )
    return module


def _modules(proj: Path) -> dict[str, ModuleType]:
    """What sys.modules holds after ``python hello.py``, plus real installed modules."""
    return {
        "__main__": _module("__main__", proj / "hello.py", script=True),
        "helper": _module("helper", proj / "helper.py"),
        "mypkg": _module("mypkg", proj / "mypkg/__init__.py"),
        "mypkg.sub": _module("mypkg.sub", proj / "mypkg/sub/__init__.py"),
        "mypkg.sub.deep": _module("mypkg.sub.deep", proj / "mypkg/sub/deep.py"),
        "builtin_thing": _module("builtin_thing", None),
        "json": sys.modules["json"],
        "os": sys.modules["os"],
        "msgspec": msgspec,
        "pytest": pytest,
        "strato.protocol.mounts": strato.protocol.mounts,
        "strato.client.mounts": client_mounts,
    }


def _paths(mount: LocalMount) -> list[list[str]]:
    return [[f.path for f in root] for root in mount.manifest.roots]


@pytest.fixture(autouse=True)
def fresh_hash_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mounts, "_hash_cache", {})


# --- collection -------------------------------------------------------------------------


def test_script_run_as_main_in_a_real_interpreter(project: Path, tmp_path: Path) -> None:
    libs = _write(tmp_path / "libs/extlib.py", "EXT = 1\n").parent
    _write(project / "helper.py", "import extlib\nVALUE = 'helper'\n")
    env = {**os.environ, "PYTHONPATH": str(libs)}
    out = subprocess.run(
        [sys.executable, str(project / "hello.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert result["main"] == "hello"
    # the script's directory first (sys.path[0]), then PYTHONPATH; stdlib, msgspec and
    # strato are all absent
    assert result["roots"] == [SHIPPED, ["extlib.py"]]
    assert all(str(tmp_path) in f for f in result["files"])


def test_synthetic_modules_exclude_stdlib_site_packages_and_strato(project: Path) -> None:
    mount = collect_local_mount(modules=_modules(project))
    assert _paths(mount) == [SHIPPED]
    assert mount.main_module_name == "hello"
    shipped = set(mount.files.values())
    assert str((project / "mypkg/core.py").resolve()) in shipped  # package shipped whole
    assert not any("strato" in Path(f).parts for f in shipped)
    by_path = {f.path: f for f in mount.manifest.roots[0]}
    assert by_path["mypkg/tool.py"].mode == 0o755
    assert by_path["helper.py"].size == len("VALUE = 'helper'\n")


def test_module_run_with_dash_m_has_no_main_module_name(project: Path) -> None:
    main = _module("mypkg.sub.deep", project / "mypkg/sub/deep.py")
    mount = collect_local_mount(modules={"__main__": main})
    assert mount.main_module_name is None
    assert _paths(mount) == [[p for p in SHIPPED if p.startswith("mypkg/")]]


def test_interactive_main_ships_nothing() -> None:
    mount = collect_local_mount(modules={"__main__": ModuleType("__main__")})
    assert mount.manifest.roots == []
    assert mount.main_module_name is None


def test_entry_modules_missing_from_modules_are_skipped(project: Path) -> None:
    mods = {"helper": _module("helper", project / "helper.py")}
    mount = collect_local_mount(entry_modules=("__main__", "nope"), modules=mods)
    assert _paths(mount) == [["helper.py"]]


def test_script_name_must_be_importable(tmp_path: Path) -> None:
    script = _write(tmp_path / "my-app.py", "")
    with pytest.raises(InvalidError, match="rename"):
        collect_local_mount(modules={"__main__": _module("__main__", script, script=True)})


def test_roots_follow_sys_path_order(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _write(tmp_path / "a/alpha.py", "")
    second = _write(tmp_path / "b/beta.py", "")
    monkeypatch.setattr(sys, "path", [str(second.parent), str(first.parent), *sys.path])
    mods = {"alpha": _module("alpha", first), "beta": _module("beta", second)}
    assert _paths(collect_local_mount(modules=mods)) == [["beta.py"], ["alpha.py"]]


def test_mount_id_is_stable_and_changes_with_content(project: Path) -> None:
    first = collect_local_mount(modules=_modules(project))
    again = collect_local_mount(modules=_modules(project))
    assert first.mount_id == again.mount_id == mount_id(first.manifest)
    assert first.mount_id.startswith("mnt-")
    shuffled = MountManifest([list(reversed(first.manifest.roots[0]))])
    assert mount_id(shuffled) == first.mount_id
    (project / "mypkg/core.py").write_text("CORE = 'changed'\n")
    assert collect_local_mount(modules=_modules(project)).mount_id != first.mount_id


def test_hash_cache_avoids_rehashing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = client_mounts._hash_file

    def counting(path: str) -> tuple[str, int]:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(client_mounts, "_hash_file", counting)
    collect_local_mount(modules=_modules(project))
    assert len(hashed) == len(SHIPPED)
    hashed.clear()
    collect_local_mount(modules=_modules(project))
    assert hashed == []
    (project / "helper.py").write_text("VALUE = 'edited, longer'\n")
    collect_local_mount(modules=_modules(project))
    assert hashed == [str((project / "helper.py").resolve())]


def test_total_size_cap_names_the_biggest_files(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "mypkg/blob.dat").write_bytes(b"x" * 5000)
    monkeypatch.setattr(client_mounts, "MAX_TOTAL_BYTES", 4096)
    with pytest.raises(InvalidError, match=r"blob\.dat"):
        collect_local_mount(modules=_modules(project))


# --- manifest validation ----------------------------------------------------------------

SHA = "0" * 64


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a/", "a\\b", "."]
)
def test_bad_paths_are_refused(path: str) -> None:
    manifest = MountManifest([[MountFile(path, SHA, 0, 0o644)]])
    with pytest.raises(InvalidError):
        validate_manifest(manifest)
    with pytest.raises(InvalidError):
        decode_manifest(encode_manifest(manifest))
    with pytest.raises(InvalidError):
        materialize(manifest, "/nonexistent-never-touched", lambda sha: b"")


@pytest.mark.parametrize(
    "files",
    [
        [MountFile("a.py", "zz", 0, 0o644)],
        [MountFile("a.py", SHA, -1, 0o644)],
        [MountFile("a.py", SHA, 0, 0o10000)],
        [MountFile("a.py", SHA, 0, 0o644), MountFile("a.py", SHA, 0, 0o644)],
        [MountFile("a", SHA, 0, 0o644), MountFile("a/b.py", SHA, 0, 0o644)],
        [MountFile("a/b.py", SHA, 0, 0o644), MountFile("a", SHA, 0, 0o644)],
    ],
)
def test_bad_entries_are_refused(files: list[MountFile]) -> None:
    with pytest.raises(InvalidError):
        validate_manifest(MountManifest([files]))


def test_manifest_round_trips(project: Path) -> None:
    manifest = collect_local_mount(modules=_modules(project)).manifest
    assert decode_manifest(encode_manifest(manifest)) == manifest
    with pytest.raises(InvalidError):
        decode_manifest(b"\x01garbage")


# --- materialisation --------------------------------------------------------------------


class Fetcher:
    def __init__(self, mount: LocalMount) -> None:
        self.mount = mount
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, sha: str) -> bytes:
        with self.lock:
            self.calls.append(sha)
        return Path(self.mount.files[sha]).read_bytes()


def test_materialized_tree_is_importable(project: Path, tmp_path: Path) -> None:
    mount = collect_local_mount(modules=_modules(project))
    cache = tmp_path / "cache"
    paths = materialize(mount.manifest, str(cache), Fetcher(mount))
    assert paths == [str(cache / "mounts" / mount.mount_id / "0")]
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; "
        "import hello, helper, mypkg.sub.deep, mypkg.tool; "
        "print(mypkg.sub.deep.DEEP, helper.VALUE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *paths],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["core-deep", "helper"]
    root = Path(paths[0])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == (
        SHIPPED
    )
    assert (root / "mypkg/tool.py").stat().st_mode & 0o777 == 0o555
    assert (root / "helper.py").stat().st_mode & 0o777 == 0o444
    assert (root / "mypkg/data.json").read_text() == '{"x": 1}\n'


def test_fetch_only_missing_blobs(project: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    mount = collect_local_mount(modules=_modules(project))
    fetch = Fetcher(mount)
    materialize(mount.manifest, cache, fetch)
    assert sorted(fetch.calls) == sorted(mount.files)  # each distinct blob once
    fetch.calls.clear()
    materialize(mount.manifest, cache, fetch)  # already present: nothing touched
    assert fetch.calls == []

    (project / "helper.py").write_text("VALUE = 'v2'\n")
    changed = collect_local_mount(modules=_modules(project))
    fetch2 = Fetcher(changed)
    paths = materialize(changed.manifest, cache, fetch2)
    helper_sha = client_mounts._hash_file(str(project / "helper.py"))[0]
    assert fetch2.calls == [helper_sha]
    assert (Path(paths[0]) / "helper.py").read_text() == "VALUE = 'v2'\n"


def test_same_content_twice_is_fetched_once(tmp_path: Path) -> None:
    a = _write(tmp_path / "src/a.py", "X = 1\n")
    b = _write(tmp_path / "src/b.py", "X = 1\n")
    mount = collect_local_mount(modules={"a": _module("a", a), "b": _module("b", b)})
    assert len(mount.files) == 1
    fetch = Fetcher(mount)
    materialize(mount.manifest, str(tmp_path / "cache"), fetch)
    assert len(fetch.calls) == 1


def test_concurrent_materialize(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = collect_local_mount(modules=_modules(project))
    cache = str(tmp_path / "cache")
    # make both threads fetch the first blob together and reach the final rename together
    fetch_barrier = threading.Barrier(2, timeout=10)
    rename_barrier = threading.Barrier(2, timeout=10)
    fetch = Fetcher(mount)
    first_fetch: set[int] = set()

    def racing_fetch(sha: str) -> bytes:
        if threading.get_ident() not in first_fetch:
            first_fetch.add(threading.get_ident())
            fetch_barrier.wait()
        return fetch(sha)

    real_rename = os.rename

    def racing_rename(src: str, dst: str) -> None:
        rename_barrier.wait()
        real_rename(src, dst)

    monkeypatch.setattr(worker_mounts.os, "rename", racing_rename)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(materialize(mount.manifest, cache, racing_fetch))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results[0] == results[1]
    root = Path(results[0][0])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == (
        SHIPPED
    )
    assert os.listdir(Path(cache) / "mounts") == [mount.mount_id]  # no temp dirs left


def test_sha_mismatch_is_refused(project: Path, tmp_path: Path) -> None:
    mount = collect_local_mount(modules=_modules(project))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256"):
        materialize(mount.manifest, str(cache), lambda sha: b"not the content")
    assert not (cache / "mounts" / mount.mount_id).exists()
    assert not [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    assert os.listdir(cache / "mounts") == []


def test_module_whose_name_does_not_match_its_path_uses_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = _write(tmp_path / "site/plugins/foo.py", "")
    _write(tmp_path / "site/plugins/bar.py", "")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    mount = collect_local_mount(modules={"loaded_by_hand": _module("loaded_by_hand", plugin)})
    assert _paths(mount) == [["plugins/bar.py", "plugins/foo.py"]]
