"""A function that drives a sandbox from inside its own container (over its channel)."""

import strato

app = strato.App("sandbox-driver")


@app.function()
def drive(code: str) -> dict:
    sb = strato.Sandbox.create(runtime="bwrap", timeout=60)  # its own app's
    try:
        p = sb.exec("python3", "-c", code)
        out = p.stdout.read()
        with sb.open("/tmp/result.txt") as f:
            written = f.read()
        return {
            "out": out,
            "code": p.wait(),
            "written": written,
            "listed": [s.object_id for s in strato.Sandbox.list()],
            "id": sb.object_id,
        }
    finally:
        sb.terminate()


@app.function()
def peek(sandbox_id: str) -> str:
    """Another app's sandbox is out of its reach."""
    try:
        strato.Sandbox.from_id(sandbox_id).exec("true")
    except strato.exceptions.NotFoundError as e:
        return f"NotFoundError: {e}"
    return "reached"
