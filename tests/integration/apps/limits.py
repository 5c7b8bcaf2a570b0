"""Functions for the payload-limit tests (a control plane with a small STRATO_MAX_PAYLOAD)."""

import strato

app = strato.App("strato-test-limits")


@app.function()
def nbytes(data: bytes) -> int:
    return len(data)


@app.function()
def make_bytes(n: int) -> bytes:
    return b"\x07" * n


@app.function()
def yield_bytes(sizes: list[int]):
    for n in sizes:
        yield b"\x07" * n
