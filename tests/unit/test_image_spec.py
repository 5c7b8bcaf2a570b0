"""Image specs: layer key chaining, image ids, validation and Python versions."""

from __future__ import annotations

import os
import sys

import msgspec
import pytest

from strato.exceptions import InvalidError
from strato.protocol import images as pi

SHA = "ab" * 32


def spec(*steps: pi.ImageStep) -> pi.ImageSpec:
    return pi.ImageSpec([pi.DebianSlim(release="bookworm", python_version="3.11"), *steps])


def test_same_spec_same_keys_and_id():
    a = spec(pi.PipInstall(["numpy==2.1.3"]), pi.Env({"A": "1", "B": "2"}))
    b = spec(pi.PipInstall(["numpy==2.1.3"]), pi.Env({"B": "2", "A": "1"}))  # dict order
    assert pi.layer_keys(a) == pi.layer_keys(b)
    assert pi.image_id(a) == pi.image_id(b)
    assert pi.image_id(a).startswith("im-") and len(pi.image_id(a)) == 3 + 32
    assert pi.image_id(a) == "im-" + pi.layer_keys(a)[-1][:32]


def test_changing_an_earlier_step_changes_every_later_key():
    steps = [pi.AptInstall(["curl"]), pi.PipInstall(["six"]), pi.RunCommands(["echo hi"])]
    base = pi.layer_keys(spec(*steps))
    changed = pi.layer_keys(spec(pi.AptInstall(["git"]), *steps[1:]))
    assert base[0] == changed[0]  # the base step is unchanged
    assert all(x != y for x, y in zip(base[1:], changed[1:], strict=True))
    # changing a later step leaves the earlier keys alone
    later = pi.layer_keys(spec(*steps[:2], pi.RunCommands(["echo bye"])))
    assert later[:3] == base[:3] and later[3] != base[3]


def test_key_is_a_prefix_hash():
    long = pi.layer_keys(spec(pi.PipInstall(["six"]), pi.RunCommands(["true"])))
    short = pi.layer_keys(spec(pi.PipInstall(["six"])))
    assert long[: len(short)] == short
    assert len(set(long)) == len(long)


def test_metadata_steps_change_later_keys():
    plain = pi.layer_keys(spec(pi.PipInstall(["six"])))
    with_env = pi.layer_keys(spec(pi.Env({"X": "1"}), pi.PipInstall(["six"])))
    with_wd = pi.layer_keys(spec(pi.Workdir("/app"), pi.PipInstall(["six"])))
    assert len({plain[-1], with_env[-1], with_wd[-1]}) == 3


def test_base_release_and_python_change_keys():
    a = pi.layer_keys(pi.ImageSpec([pi.DebianSlim("bookworm", "3.11")]))
    b = pi.layer_keys(pi.ImageSpec([pi.DebianSlim("trixie", "3.13")]))
    assert a != b


def test_add_files_order_does_not_matter_but_content_does():
    f1, f2 = ("/app/a.py", "aa" * 32, 0o644), ("/app/b.py", "bb" * 32, 0o644)
    assert pi.image_id(spec(pi.AddFiles([f1, f2]))) == pi.image_id(spec(pi.AddFiles([f2, f1])))
    f2b = ("/app/b.py", "cc" * 32, 0o644)
    assert pi.image_id(spec(pi.AddFiles([f1, f2]))) != pi.image_id(spec(pi.AddFiles([f1, f2b])))


def test_run_function_fingerprint_replaces_the_pickle_in_the_key():
    a = pi.RunFunction(pickled=b"pickle-1", name="setup", fingerprint="fp")
    b = pi.RunFunction(pickled=b"pickle-2", name="setup", fingerprint="fp")
    c = pi.RunFunction(pickled=b"pickle-1", name="setup")
    d = pi.RunFunction(pickled=b"pickle-2", name="setup")
    assert pi.image_id(spec(a)) == pi.image_id(spec(b))
    assert pi.image_id(spec(c)) != pi.image_id(spec(d))


def test_spec_roundtrips_on_the_wire():
    s = spec(
        pi.PipInstall(["numpy"], ["--pre"]),
        pi.UvPipInstall(["six"], requirements="attrs\n"),
        pi.AptInstall(["curl"]),
        pi.RunCommands(["echo hi"]),
        pi.RunFunction(pickled=b"\x80\x05", name="f"),
        pi.Env({"A": "1"}),
        pi.Workdir("/app"),
        pi.AddFiles([("/app/x.py", SHA, 0o644)]),
    )
    for codec in (msgspec.json, msgspec.msgpack):
        back = codec.decode(codec.encode(s), type=pi.ImageSpec)
        assert back == s
        assert pi.layer_keys(back) == pi.layer_keys(s)
    pi.validate_spec(s)


def test_keys_are_stable_across_releases():
    # a change to the key scheme invalidates every cache: do it on purpose (KEY_VERSION)
    keys = pi.layer_keys(spec(pi.PipInstall(["six"])))
    assert keys == pi.layer_keys(spec(pi.PipInstall(["six"])))
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


# -- python versions -------------------------------------------------------------------


def test_python_versions_map_to_debian_releases():
    assert pi.debian_slim("3.11") == pi.DebianSlim("bookworm", "3.11")
    assert pi.debian_slim("3.13") == pi.DebianSlim("trixie", "3.13")


@pytest.mark.parametrize("version", ["3.12", "3.10", "2.7", "3.11.4", "3", "latest"])
def test_unavailable_python_lists_what_is_available(version):
    with pytest.raises(InvalidError) as e:
        pi.debian_slim(version)
    assert "3.11 (bookworm), 3.13 (trixie)" in str(e.value)
    assert repr(version) in str(e.value)


def test_default_python_is_the_clients(monkeypatch):
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if mine in pi.DEBIAN_PYTHONS:
        assert pi.debian_slim().python_version == mine
    monkeypatch.setattr(pi, "client_python_version", lambda: "3.12")
    with pytest.raises(InvalidError, match=r"this Python \(3\.12.*3\.11 \(bookworm\)"):
        pi.debian_slim()


def test_mismatched_release_and_python_is_invalid():
    with pytest.raises(InvalidError, match="Available"):
        pi.validate_spec(pi.ImageSpec([pi.DebianSlim("bookworm", "3.13")]))


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req",
    [
        "numpy",
        "numpy==2.1.3",
        "Pillow>=10,<11",
        "pkg[extra,other]>=1",
        "a.b-c_d",
        "x ; python_version>'3'",
        "pkg @ https://example.com/pkg.whl",
        "git+https://github.com/a/b.git",
        "torch~=2.0",
    ],
)
def test_good_pip_requirements(req):
    pi.validate_step(pi.PipInstall([req]))


@pytest.mark.parametrize(
    ("req", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("--pre", "option"),
        ("-r reqs.txt", "option"),
        ("numpy\nscipy", "line break"),
        ("-numpy", "option"),
        ("num$py", "not a valid"),
        ("_bad", "not a valid"),
        ("a\x00b", "NUL"),
    ],
)
def test_bad_pip_requirements(req, match):
    with pytest.raises(InvalidError, match=match):
        pi.validate_step(pi.PipInstall([req]))


def test_pip_install_needs_something():
    with pytest.raises(InvalidError, match="no packages"):
        pi.validate_step(pi.PipInstall([]))
    pi.validate_step(pi.PipInstall([], requirements="six\n"))
    with pytest.raises(InvalidError, match="uv_pip_install"):
        pi.validate_step(pi.UvPipInstall(["--system"]))


@pytest.mark.parametrize(
    "name",
    [
        "curl",
        "libgl1-mesa-glx",
        "g++",
        "libc6:amd64",
        "git=1:2.39.5-0+deb12u1",
        "python3.11",
        "nginx/bookworm-backports",
    ],
)
def test_good_apt_packages(name):
    pi.validate_step(pi.AptInstall([name]))


@pytest.mark.parametrize("name", ["", "Curl", "-y", "curl wget", "a;rm -rf /", "$(id)"])
def test_bad_apt_packages(name):
    with pytest.raises(InvalidError, match="Debian package name"):
        pi.validate_step(pi.AptInstall([name]))


def test_apt_install_needs_packages():
    with pytest.raises(InvalidError, match="no packages"):
        pi.validate_step(pi.AptInstall([]))


@pytest.mark.parametrize("commands", [[], [""], ["  "], ["echo a", "\n"]])
def test_empty_commands(commands):
    with pytest.raises(InvalidError, match="run_commands"):
        pi.validate_step(pi.RunCommands(commands))


@pytest.mark.parametrize("path", ["app", "./app", "", "/app/../etc", "/a\x00b"])
def test_workdir_must_be_absolute(path):
    with pytest.raises(InvalidError, match="workdir"):
        pi.validate_step(pi.Workdir(path))


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "ÄB"])
def test_bad_env_names(name):
    with pytest.raises(InvalidError, match="environment variable name"):
        pi.validate_step(pi.Env({name: "x"}))


def test_good_env():
    pi.validate_step(pi.Env({"_A1": "", "PATH": "/x:/y", "B": "with spaces = and 'quotes'"}))


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([], "no files"),
        ([("rel/x.py", SHA, 0o644)], "absolute"),
        ([("/", SHA, 0o644)], "'/'"),
        ([("/a/../b", SHA, 0o644)], r"\.\."),
        ([("/a", "xyz", 0o644)], "sha256"),
        ([("/a", SHA, 0o17777)], "mode"),
        ([("/a", SHA, 0o644), ("/a", SHA, 0o600)], "two files"),
    ],
)
def test_bad_add_files(files, match):
    with pytest.raises(InvalidError, match=match):
        pi.validate_step(pi.AddFiles(files))


def test_run_function_checks():
    with pytest.raises(InvalidError, match="empty"):
        pi.validate_step(pi.RunFunction(pickled=b"", name="f"))
    with pytest.raises(InvalidError, match="pickled by Python 3.13"):
        pi.validate_spec(spec(pi.RunFunction(pickled=b"x", name="f", python_version="3.13")))


def test_spec_must_start_with_one_base():
    with pytest.raises(InvalidError, match="start with"):
        pi.validate_spec(pi.ImageSpec([]))
    with pytest.raises(InvalidError, match="start with"):
        pi.validate_spec(pi.ImageSpec([pi.PipInstall(["six"])]))
    with pytest.raises(InvalidError, match="first step"):
        pi.validate_spec(spec(pi.DebianSlim("bookworm", "3.11")))
    with pytest.raises(InvalidError):
        pi.image_id(pi.ImageSpec([]))


def test_describe_step():
    assert pi.describe_step(pi.PipInstall(["numpy==2.1.3"])) == "pip_install numpy==2.1.3"
    assert pi.describe_step(pi.Env({"SECRET": "hunter2"})) == "env SECRET=..."
    assert len(pi.describe_step(pi.RunCommands(["x" * 500]))) == 100


# -- the host's package sources, passed into builds -------------------------------------


def test_host_pip_config_is_rewritten_for_the_sandbox(tmp_path, monkeypatch):
    from strato.images import hostconf

    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "ca.pem"
    cert.write_text("cert")
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\n"
        f"extra-index-url = file://{index} https://mirror.example/simple\n"
        "index-url = https://pypi.example/simple\n"
        f"cert = {cert}\n"
        "[install]\ntrusted-host = mirror.example\n"
    )
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "none"))
    monkeypatch.setenv("PIP_FIND_LINKS", f"{wheels} /does/not/exist")
    monkeypatch.setattr(hostconf, "_pip_config_files", lambda: [conf])
    src = hostconf.package_sources()
    inside = hostconf.HOST_MOUNT
    assert src.pip_env["PIP_INDEX_URL"] == "https://pypi.example/simple"
    assert src.pip_env["PIP_EXTRA_INDEX_URL"] == (
        f"file://{inside}{index} https://mirror.example/simple"
    )
    assert src.pip_env["PIP_FIND_LINKS"] == f"{inside}{wheels}"
    assert src.pip_env["PIP_CERT"] == src.uv_env["SSL_CERT_FILE"] == f"{inside}{cert}"
    assert src.pip_env["PIP_TRUSTED_HOST"] == "mirror.example"
    assert src.uv_env["UV_EXTRA_INDEX_URL"] == src.pip_env["PIP_EXTRA_INDEX_URL"]
    # a local index brings its parent (indexes link to ../../files/...)
    assert {(b.host, b.dest) for b in src.binds} == {
        (str(index.parent), f"{inside}{index.parent}"),
        (str(wheels), f"{inside}{wheels}"),
        (str(cert), f"{inside}{cert}"),
    }
    assert all(not b.writable for b in src.binds)


def test_debian_mirror_from_apt_sources(tmp_path, monkeypatch):
    from strato.images.hostconf import DEFAULT_MIRROR, debian_mirror

    monkeypatch.delenv("STRATO_DEBIAN_MIRROR", raising=False)
    assert debian_mirror(tmp_path) == DEFAULT_MIRROR
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# old style\ndeb [arch=amd64 signed-by=/k.gpg] http://old.example/debian bookworm main\n"
    )
    assert debian_mirror(tmp_path) == "http://old.example/debian"
    monkeypatch.setenv("STRATO_DEBIAN_MIRROR", "http://override.example/debian/")
    assert debian_mirror(tmp_path) == "http://override.example/debian"


def test_pip_options():
    assert pi.pip_options() == []
    assert pi.pip_options(
        find_links="/w",
        index_url="https://i/simple",
        extra_index_url="https://e/simple",
        pre=True,
        extra_options="--no-deps  --only-binary :all:",
    ) == [
        "--find-links",
        "/w",
        "--index-url",
        "https://i/simple",
        "--extra-index-url",
        "https://e/simple",
        "--pre",
        "--no-deps",
        "--only-binary",
        ":all:",
    ]


def test_image_build_error_pickles_with_its_details():
    import pickle

    from strato.exceptions import ExecutionError
    from strato.images import ImageBuildError

    e = pickle.loads(pickle.dumps(ImageBuildError("boom", command="make", output_tail="x")))
    assert isinstance(e, ExecutionError)
    assert (str(e), e.command, e.output_tail) == ("boom", "make", "x")
