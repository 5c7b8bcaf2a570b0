"""Address ranges a container may reach (``cidr_allowlist``): checked where a request is
made (the SDK, the control plane) and where it is enforced (the runtime). Standard
library only, like :mod:`strato.settings`, so every side may import it."""

from __future__ import annotations

import ipaddress

from strato.exceptions import InvalidError

MAX_ALLOWED_RANGES = 256


def parse_allowlist(cidrs: list[str], block_network: bool = False) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 ranges of a ``cidr_allowlist`` in normal form; raises
    ``InvalidError`` for a range that is not one (``"10.0.0.0/8"``, ``"2001:db8::/32"``, a
    single address) or when the container has no network at all."""
    if block_network:
        raise InvalidError(
            "cidr_allowlist and block_network=True contradict each other: give one "
            "(block_network=True allows nothing; cidr_allowlist=[...] allows only its ranges)."
        )
    if len(cidrs) > MAX_ALLOWED_RANGES:
        raise InvalidError(
            f"cidr_allowlist has {len(cidrs)} ranges: at most {MAX_ALLOWED_RANGES}; merge some."
        )
    v4: list[str] = []
    v6: list[str] = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(str(cidr), strict=True)
        except ValueError as e:
            raise InvalidError(
                f"cidr_allowlist: {cidr!r} is not an address range ({e}); write it as "
                "'10.0.0.0/8', '2001:db8::/32' or a single address."
            ) from None
        (v4 if net.version == 4 else v6).append(str(net))
    return v4, v6
