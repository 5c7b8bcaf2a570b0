"""Node inventory: configuration overrides, nvidia-smi parsing, detection from the machine."""

from __future__ import annotations

import os

import pytest

from strato.exceptions import InvalidError
from strato.worker.resources import (
    NodeInventory,
    detect_inventory,
    parse_gpu_override,
    parse_nvidia_smi,
)

SMI_OUTPUT = """\
0, NVIDIA H100 80GB HBM3
1, NVIDIA H100 80GB HBM3
2, NVIDIA A100-SXM4-80GB
3, Tesla T4
"""


def _no_smi() -> str | None:
    raise AssertionError("nvidia-smi must not be queried when STRATO_NODE_GPUS is set")


def test_overrides_win() -> None:
    env = {
        "STRATO_NODE_CPU": "3.5",
        "STRATO_NODE_MEMORY_MB": "8192",
        "STRATO_NODE_GPUS": "H100:2,A100-80GB:1",
        "STRATO_NODE_REGION": "eu-west",
        "STRATO_NODE_PRICE_PER_HOUR": "2.25",
        "STRATO_NODE_LABELS": "zone=a, tier=spot",
    }
    inv = detect_inventory(env, nvidia_smi=_no_smi)
    assert inv == NodeInventory(
        cpu=3.5,
        memory_mb=8192,
        gpus={"H100": [0, 1], "A100-80GB": [2]},
        region="eu-west",
        price_per_hour=2.25,
        labels={"zone": "a", "tier": "spot"},
    )
    assert inv.gpu_count == 3


def test_empty_gpu_override_means_none() -> None:
    inv = detect_inventory({"STRATO_NODE_GPUS": ""}, nvidia_smi=_no_smi)
    assert inv.gpus == {}
    assert inv.gpu_count == 0


def test_detected_from_machine() -> None:
    inv = detect_inventory({}, nvidia_smi=lambda: None)
    assert 0 < inv.cpu <= len(os.sched_getaffinity(0))
    assert inv.memory_mb > 0
    assert inv.gpus == {}
    assert inv.region is None
    assert inv.price_per_hour == 0.0
    assert inv.labels == {}


def test_gpus_from_nvidia_smi() -> None:
    inv = detect_inventory({"STRATO_NODE_CPU": "1"}, nvidia_smi=lambda: SMI_OUTPUT)
    assert inv.gpus == {"H100": [0, 1], "A100-80GB": [2], "T4": [3]}


def test_nvidia_smi_via_path_shim(tmp_path, monkeypatch) -> None:
    shim = tmp_path / "nvidia-smi"
    shim.write_text("#!/bin/sh\necho '0, NVIDIA L4'\necho '1, NVIDIA L4'\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert detect_inventory({"STRATO_NODE_CPU": "1"}).gpus == {"L4": [0, 1]}


def test_failing_nvidia_smi_means_no_gpus(tmp_path, monkeypatch) -> None:
    shim = tmp_path / "nvidia-smi"
    shim.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert detect_inventory({"STRATO_NODE_CPU": "1"}).gpus == {}


def test_parse_nvidia_smi_skips_junk_and_keeps_unknown_names() -> None:
    out = "garbage\n\n0, NVIDIA GeForce GTX 1080\n1, NVIDIA L40S\n"
    assert parse_nvidia_smi(out) == {"NVIDIA GeForce GTX 1080": [0], "L40S": [1]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("H100:2", {"H100": [0, 1]}),
        ("h100:1, t4:2", {"H100": [0], "T4": [1, 2]}),
        ("A100", {"A100-40GB": [0]}),
        ("H100:0,L4:1", {"L4": [0]}),
        ("H100:1,L4:1,H100:1", {"H100": [0, 2], "L4": [1]}),
    ],
)
def test_parse_gpu_override(text: str, expected: dict[str, list[int]]) -> None:
    assert parse_gpu_override(text) == expected


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STRATO_NODE_CPU", "lots"),
        ("STRATO_NODE_CPU", "0"),
        ("STRATO_NODE_CPU", "-2"),
        ("STRATO_NODE_CPU", "nan"),
        ("STRATO_NODE_MEMORY_MB", "1.5"),
        ("STRATO_NODE_MEMORY_MB", "0"),
        ("STRATO_NODE_MEMORY_MB", "8G"),
        ("STRATO_NODE_GPUS", "H100:two"),
        ("STRATO_NODE_GPUS", ":2"),
        ("STRATO_NODE_GPUS", "H100:-1"),
        ("STRATO_NODE_PRICE_PER_HOUR", "-1"),
        ("STRATO_NODE_PRICE_PER_HOUR", "cheap"),
        ("STRATO_NODE_LABELS", "novalue"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    env = {"STRATO_NODE_CPU": "1", "STRATO_NODE_MEMORY_MB": "1024", var: value}
    with pytest.raises(InvalidError, match=var):
        detect_inventory(env, nvidia_smi=lambda: None)
