"""The entrypoint of a sandbox's container: ``python -S -m strato.container.sandbox_entry``
runs the sandbox agent (:mod:`strato.container.sandbox_agent`) and nothing else. It reads
its spec with the agent's own codec (:mod:`strato.container.sandbox_wire`): no msgspec,
whose imports took about 100 ms of a gVisor sandbox's start."""

from strato import settings
from strato.container.sandbox_agent import main
from strato.container.sandbox_wire import load_sandbox_spec

with open(settings.CONTAINER_SPEC.required(), "rb") as f:
    main(load_sandbox_spec(f.read()))
