"""The declarations of ``STRATO_*`` settings: every variable the code names is declared,
values parse to their type, bad ones raise an error naming the variable, and the docs'
table is the one the declarations generate."""

from __future__ import annotations

import ast
import json
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from strato import settings
from strato.exceptions import InvalidError, SettingError

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "strato"
NAME = re.compile(r"STRATO_[A-Z0-9_]*[A-Z0-9]\b(?!_)")


def _names_in(root: Path) -> dict[str, str]:
    """Every ``STRATO_*`` name in a string or a keyword argument under ``root``, with a
    file that names it (prefixes such as ``STRATO_WEB_*`` in prose are not names)."""
    found: dict[str, str] = {}
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            texts: list[str] = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append(node.value)
            elif isinstance(node, ast.keyword) and node.arg:
                texts.append(node.arg)
            for text in texts:
                for m in NAME.finditer(text):
                    if text[m.end() : m.end() + 1] not in ("_", "*"):
                        found.setdefault(m.group(), str(path.relative_to(root)))
    return found


def test_every_variable_the_code_names_is_declared():
    found = _names_in(SRC)
    assert len(found) > 60  # the scan itself works
    undeclared = {n: f for n, f in found.items() if n not in settings.REGISTRY}
    assert undeclared == {}


def test_the_scan_sees_reads_and_writes(tmp_path):
    # the check above must be able to fail: names read, set or passed as keywords are seen
    (tmp_path / "m.py").write_text(
        '"""Reads ``STRATO_WEB_*`` settings."""\n'
        "import os\n"
        'a = os.environ.get("STRATO_NOT_DECLARED")\n'
        "b = dict(STRATO_ALSO_NOT=1)\n"
        '_STRATO_DIR = "x"\n'
    )
    assert set(_names_in(tmp_path)) == {"STRATO_NOT_DECLARED", "STRATO_ALSO_NOT"}


def _reads_by_name(root: Path) -> list[str]:
    """Places under ``root`` that read a ``STRATO_*`` variable by name instead of through
    its declaration: ``env["STRATO_X"]``, ``env.get("STRATO_X")``, ``os.getenv("STRATO_X")``
    (setting one for a child process, ``env["STRATO_X"] = ...``, is no read)."""
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            key = None
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                key = node.slice
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "getenv", "pop")
                and node.args
            ):
                key = node.args[0]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                if NAME.fullmatch(key.value):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {key.value}")
    return found


def test_settings_are_read_only_through_their_declarations():
    reads = [r for r in _reads_by_name(SRC) if not r.startswith("settings.py:")]
    assert reads == []


def test_the_read_scan_sees_reads_but_not_writes(tmp_path):
    (tmp_path / "m.py").write_text(
        "import os\n"
        'a = os.environ.get("STRATO_A")\n'
        'b = os.environ["STRATO_B"]\n'
        'c = os.getenv("STRATO_C", "")\n'
        'os.environ["STRATO_D"] = "1"\n'
        'env = dict(STRATO_E="1")\n'
    )
    assert [r.rsplit(" ", 1)[1] for r in _reads_by_name(tmp_path)] == [
        "STRATO_A",
        "STRATO_B",
        "STRATO_C",
    ]


def test_each_setting_is_declared_once_with_meaning_and_readers():
    for name, s in settings.REGISTRY.items():
        assert s.name == name
        assert s.meaning.strip() and s.readers, name
        assert set(s.readers) <= set(typing.get_args(settings.Reader)), name
    with pytest.raises(ValueError, match="declared twice"):
        settings.text("STRATO_HOME", "", "again", (settings.CLIENT,))


def test_unset_and_empty_give_the_default():
    assert settings.MAX_PAYLOAD.get({}) == 256 << 20
    assert settings.MAX_PAYLOAD.get({"STRATO_MAX_PAYLOAD": " "}) == 256 << 20
    assert settings.LOCAL_WORKER.get({}) is True
    assert settings.HOME.get({}) == Path.home() / ".strato"
    assert settings.GATEWAY_PORT.get({}) is None
    assert settings.WORKER_RESTART_BACKOFF.get({}) == (0.5, 30.0)


def test_values_parse_to_their_type():
    env = {
        "STRATO_MAX_PAYLOAD": "1e6",
        "STRATO_WEB_HTTP_LIMIT": "2.5",
        "STRATO_LOCAL_WORKER": "no",
        "STRATO_ZYGOTE": "TRUE",
        "STRATO_HOME": "~/x",
        "STRATO_PREIMPORT": "torch, numpy,scipy.linalg",
        "STRATO_WORKER_RESTART_BACKOFF": "0.1,2",
        "STRATO_LOG_LEVEL": "debug",
        "STRATO_ZYGOTE_MODE": "template",
        "STRATO_MOUNT_PATHS": "/a::/b",
        "STRATO_GATEWAY_PORT": "-1",
    }
    assert settings.MAX_PAYLOAD.get(env) == 1_000_000
    assert isinstance(settings.MAX_PAYLOAD.get(env), int)
    assert settings.WEB_HTTP_LIMIT.get(env) == 2.5
    assert settings.LOCAL_WORKER.get(env) is False
    assert settings.ZYGOTE.get(env) is True
    assert settings.HOME.get(env) == Path("~/x").expanduser()
    assert settings.PREIMPORT.get(env) == ("torch", "numpy", "scipy.linalg")
    assert settings.WORKER_RESTART_BACKOFF.get(env) == (0.1, 2.0)
    assert settings.LOG_LEVEL.get(env) == "DEBUG"
    assert settings.ZYGOTE_MODE.get(env) == "template"
    assert settings.MOUNT_PATHS.get(env) == ("/a", "/b")
    assert settings.GATEWAY_PORT.get(env) == -1


def test_an_empty_gpu_list_is_a_value():
    assert settings.NODE_GPUS.is_set({"STRATO_NODE_GPUS": ""})
    assert not settings.NODE_GPUS.is_set({})


@pytest.mark.parametrize(
    "name, value",
    [
        ("STRATO_PORT", "http"),
        ("STRATO_PORT", "70000"),
        ("STRATO_MAX_PAYLOAD", "1.5"),
        ("STRATO_MAX_PAYLOAD", "0"),
        ("STRATO_WEB_HTTP_LIMIT", "0"),
        ("STRATO_WEB_HTTP_LIMIT", "nan"),
        ("STRATO_HEADER_TIMEOUT", "-1"),
        ("STRATO_APP_MAX_SHARE", "2"),
        ("STRATO_APP_MAX_CONTAINERS", "0"),
        ("STRATO_LOCAL_WORKER", "maybe"),
        ("STRATO_LOG_LEVEL", "loud"),
        ("STRATO_WORKER_RESTART_BACKOFF", "5"),
        ("STRATO_WORKER_RESTART_BACKOFF", "5,1"),
        ("STRATO_PREIMPORT", "torch;rm -rf"),
        ("STRATO_ZYGOTE_MODE", "other"),
        ("STRATO_CONTAINER_UID", "0"),
        ("STRATO_NODE_MEMORY_MB", "8G"),
    ],
)
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(SettingError) as e:
        settings.REGISTRY[name].get({name: value})
    assert isinstance(e.value, InvalidError)
    assert e.value.name == name and e.value.value == value
    assert str(e.value).startswith(f"{name}={value!r} is not valid: expected ")


def test_a_setting_error_pickles_whole():
    err = SettingError("STRATO_PORT", "x", "a whole number")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.name, back.value, str(back)) == (
        SettingError,
        "STRATO_PORT",
        "x",
        str(err),
    )


def test_the_module_imports_only_the_standard_library():
    probe = (
        "import sys; before = set(sys.modules); import strato.settings; "
        "import json; print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    strato_mods = {m for m in loaded if m == "strato" or m.startswith("strato.")}
    parts = {"strato.settings_" + p for p in ("base", "home", "server", "worker", "container")}
    assert strato_mods <= {"strato", "strato.settings", "strato.exceptions"} | parts
    stdlib = set(sys.stdlib_module_names)
    foreign = [m for m in loaded if m.split(".")[0] not in stdlib | {"strato"}]
    assert foreign == []


def test_docs_table_is_generated_from_the_declarations():
    table = (ROOT / "docs" / "settings.md").read_text()
    assert table == settings.markdown(), (
        "docs/settings.md is out of date: run "
        "`python -m strato.settings --markdown > docs/settings.md`"
    )
    for name in settings.REGISTRY:
        assert f"`{name}`" in table
