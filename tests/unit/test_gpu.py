"""parse_gpu, canonical_gpu_name and gpu_request_str."""

from __future__ import annotations

import msgspec
import pytest

from strato.exceptions import InvalidError
from strato.protocol.gpu import (
    KNOWN_GPU_TYPES,
    GpuRequest,
    canonical_gpu_name,
    gpu_request_str,
    parse_gpu,
)


def test_none_means_no_gpu() -> None:
    assert parse_gpu(None) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("H100", GpuRequest("H100", 1)),
        ("h100", GpuRequest("H100", 1)),
        (" t4 ", GpuRequest("T4", 1)),
        ("A100-80GB:2", GpuRequest("A100-80GB", 2)),
        ("a100-80gb:2", GpuRequest("A100-80GB", 2)),
        ("A100", GpuRequest("A100-40GB", 1)),
        ("A100:4", GpuRequest("A100-40GB", 4)),
        ("H100!", GpuRequest("H100", 1)),
        ("H100!:2", GpuRequest("H100", 2)),
        ("l40s", GpuRequest("L40S", 1)),
        ("a10g", GpuRequest("A10G", 1)),
        ("A10", GpuRequest("A10", 1)),
        ("rtx-4090", GpuRequest("RTX-4090", 1)),
        ("B200:8", GpuRequest("B200", 8)),
        ("H200: 3", GpuRequest("H200", 3)),
        ("any", GpuRequest(None, 1)),
        ("ANY:2", GpuRequest(None, 2)),
    ],
)
def test_single_string_forms(spec: str, expected: GpuRequest) -> None:
    assert parse_gpu(spec) == [expected]


def test_list_keeps_fallback_order() -> None:
    assert parse_gpu(["h100:2", "A100-80GB:2", "any"]) == [
        GpuRequest("H100", 2),
        GpuRequest("A100-80GB", 2),
        GpuRequest(None, 1),
    ]


def test_every_known_type_parses_to_itself_in_any_case() -> None:
    for name in KNOWN_GPU_TYPES:
        assert parse_gpu(name.lower()) == [GpuRequest(name, 1)]
        assert parse_gpu(f"{name}:8") == [GpuRequest(name, 8)]


@pytest.mark.parametrize(
    "spec", ["H1000", "", ":2", "H100:0", "H100:9", "H100:-1", "H100:two", "H100:1.5", "H100:2:3"]
)
def test_bad_strings_are_refused_with_a_helpful_message(spec: str) -> None:
    with pytest.raises(InvalidError) as info:
        parse_gpu(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "TYPE[:COUNT]" in message
    assert "H100" in message and "A100-80GB" in message and "any" in message


def test_unknown_type_in_a_list_names_that_entry() -> None:
    with pytest.raises(InvalidError, match="'K80'"):
        parse_gpu(["H100", "K80"])


def test_empty_list_is_refused() -> None:
    with pytest.raises(InvalidError, match="gpu=None"):
        parse_gpu([])


@pytest.mark.parametrize("spec", [1, 2.0, {"H100": 1}, ["H100", 2]])
def test_non_strings_are_refused(spec: object) -> None:
    with pytest.raises(InvalidError):
        parse_gpu(spec)  # type: ignore[arg-type]


def test_gpu_request_is_frozen_and_round_trips_msgspec() -> None:
    req = GpuRequest("H100", 2)
    with pytest.raises(AttributeError):
        req.count = 3  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(req), type=GpuRequest) == req
    assert GpuRequest("T4") == GpuRequest("T4", 1)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("  nvidia h100 80gb hbm3\n", "H100"),
    ],
)
def test_canonical_gpu_name_maps_nvidia_smi_names(device: str, expected: str) -> None:
    assert canonical_gpu_name(device) == expected


@pytest.mark.parametrize(
    "device", ["NVIDIA GH200 480GB", "NVIDIA H800", "AMD Instinct MI300X", "", "Quadro K620"]
)
def test_canonical_gpu_name_unknown_devices(device: str) -> None:
    assert canonical_gpu_name(device) is None


def test_canonical_gpu_name_accepts_canonical_names() -> None:
    for name in KNOWN_GPU_TYPES:
        assert canonical_gpu_name(name) == name


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (GpuRequest("H100", 1), "H100"),
        (GpuRequest("A100-80GB", 2), "A100-80GB:2"),
        (GpuRequest(None, 1), "any"),
        (GpuRequest(None, 4), "any:4"),
    ],
)
def test_gpu_request_str(req: GpuRequest, text: str) -> None:
    assert gpu_request_str(req) == text
    assert parse_gpu(text) == [req]
