"""Functions for test_sandbox_limits: a disk fill in a function with ``ephemeral_disk=``
under each isolating runtime (image-less: the host's interpreter, a minimal root)."""

from __future__ import annotations

import strato

app = strato.App("strato-test-limits")
RUNTIMES = ("bwrap", "gvisor")
DISK_MB = 16


def _fill(path: str) -> tuple[str, int]:
    """Write 1 MiB blocks to ``path`` until an error; (its errno name, MiB written)."""
    import errno

    written = 0
    block = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while written < (1 << 30):
                f.write(block)
                f.flush()
                written += len(block)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno)), written >> 20
    return "no limit", written >> 20


fill = {
    rt: app.function(runtime=rt, ephemeral_disk=DISK_MB, name=f"fill_{rt}")(_fill)
    for rt in RUNTIMES
}
