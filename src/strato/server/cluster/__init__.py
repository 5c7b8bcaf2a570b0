"""Many machines (issue 11): worker agents that join over TCP with a join token, the
relay of their containers' channel connections, and node cordon/drain/remove."""

from .join_tokens import JoinTokens
from .relay import RelayHub

__all__ = ["JoinTokens", "RelayHub"]
