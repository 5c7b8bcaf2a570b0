"""The entrypoint of a sandbox's container: ``python -S -m strato.container.sandbox_entry``
runs the sandbox agent (:mod:`strato.container.sandbox_agent`) and nothing else.

msgspec imports ``typing_extensions`` where it is installed, only to understand the
types that module defines; the agent's messages use none of them, and under gVisor that
import (with ``inspect``, ``ast``, ``dis``, ``tokenize``...) took a sixth of the agent's
start here (36 of 211 ms). This process runs only the agent, so it goes without."""

import sys

sys.modules.setdefault("typing_extensions", None)  # type: ignore[arg-type]

from strato.container.sandbox_agent import main  # noqa: E402
from strato.container.spec_file import load_spec  # noqa: E402

main(load_spec())
