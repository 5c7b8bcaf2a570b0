"""The pure parts of sandbox limits: CPU weights, allowlists and their nftables rules, the
size of a container's tmpfs folders under bwrap and gVisor."""

from __future__ import annotations

import pytest

from strato.cidr import parse_allowlist
from strato.exceptions import InvalidError
from strato.runtime.base import ContainerLaunch
from strato.runtime.bwrap import build_args
from strato.runtime.cgroups import cpu_weight
from strato.runtime.gvisor import build_spec
from strato.runtime.isolation import RootEntry, check_launch
from strato.runtime.network import allow_ruleset


def test_cpu_weight_follows_the_request():
    assert cpu_weight(1.0, 1) == 1024 and cpu_weight(1.0, 2) == 100
    assert cpu_weight(2.5, 1) == 2560 and cpu_weight(2.5, 2) == 250
    # never below the default: what reserved little gets as much as what reserved nothing
    assert cpu_weight(1 / 64, 1) == 1024 and cpu_weight(1 / 64, 2) == 100
    assert cpu_weight(4096, 1) == 262_144 and cpu_weight(4096, 2) == 10_000  # the maxima


def test_allowlist_parsing():
    assert parse_allowlist(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]) == (
        ["10.0.0.0/8", "192.0.2.7/32"],
        ["2001:db8::/32"],
    )
    assert parse_allowlist([]) == ([], [])
    for bad in ("10.0.0.1/8", "example.com", "10.0.0.0/33", ""):
        with pytest.raises(InvalidError, match="not an address range"):
            parse_allowlist([bad])
    with pytest.raises(InvalidError, match="block_network"):
        parse_allowlist(["10.0.0.0/8"], block_network=True)
    with pytest.raises(InvalidError, match="at most"):
        parse_allowlist([f"10.0.{i // 256}.{i % 256}" for i in range(300)])


def test_allow_ruleset_accepts_only_its_ranges():
    rules = allow_ruleset(["10.0.0.0/8"], [])
    assert "ip daddr { 10.0.0.0/8 } accept" in rules
    assert "ip6 daddr" not in rules
    assert rules.rstrip().splitlines()[-3].strip() == "reject with icmpx admin-prohibited"
    assert "10.0.2.3 udp dport 53 accept" in rules  # DNS through slirp4netns' forwarder


def _launch(**kw) -> ContainerLaunch:
    return ContainerLaunch("ct-limits", ["/bin/true"], {}, "/", **kw)


def test_bwrap_sizes_every_tmpfs():
    root = [RootEntry("tmpfs", "", "/tmp"), RootEntry("tmpfs", "", "/root")]
    args = build_args(_launch(disk_mb=32), rootfs=None, workdir="/", gpu_nodes=[], root=root)
    tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert tmpfs == ["/tmp", "/root", "/run", "/dev/shm"]
    sized = [args[i + 3] for i, a in enumerate(args) if a == "--size"]
    assert args.count("--size") == 4 and str(32 << 20) in args
    assert sized == tmpfs
    args = build_args(_launch(), rootfs=None, workdir="/", gpu_nodes=[], root=root)
    assert "--size" not in args


def test_gvisor_sizes_every_tmpfs_it_may_write():
    spec = build_spec(_launch(disk_mb=32), env={}, workdir="/", readonly_root=True,
                      user=(65534, 65534), fresh=["/tmp", "/root"])  # fmt: skip
    sized = {m["destination"] for m in spec["mounts"] if "size=32m" in m.get("options", [])}
    assert sized == {"/tmp", "/dev/shm", "/root", "/run"}
    spec = build_spec(_launch(), env={}, workdir="/", readonly_root=True)
    assert not any("size=" in o for m in spec["mounts"] for o in m.get("options", []))


def test_a_launch_with_bad_limits_is_refused():
    with pytest.raises(InvalidError, match="disk_mb"):
        check_launch(_launch(disk_mb=0))
    with pytest.raises(InvalidError, match="block_network"):
        check_launch(_launch(cidr_allowlist=["10.0.0.0/8"], block_network=True))
