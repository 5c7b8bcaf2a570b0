"""The spec of the function a container runs: the file ``$STRATO_CONTAINER_SPEC`` names."""

from __future__ import annotations

import msgspec

from strato import settings
from strato.protocol import messages as m


def load_spec() -> m.FunctionSpec:
    with open(settings.CONTAINER_SPEC.required(), "rb") as f:
        return msgspec.msgpack.decode(f.read(), type=m.FunctionSpec)
