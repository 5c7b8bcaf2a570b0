"""Node credentials: what a joined worker agent fetches its node's code, blobs, image
inputs and volumes with over the HTTP API (never the installation's API token).

Each hello of a joined agent is issued a new credential for its node (``stn_<id>_<secret>``;
the one it had before stops working), kept as sha256 in memory only: a restarted control
plane knows none, and agents get new ones when they join again. A credential is revoked
when its node is removed (``strato node remove``) and when the join token its agent
joined with is revoked (``revoked_join_tokens`` sees the join-token file change). The
routes open to it (``node=True`` in ``api/router.py``) check what it names against the
containers placed on its node.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import bearer
from .join_tokens import JoinTokens

PREFIX = "stn_"


@dataclass(frozen=True)
class _Credential:
    node_id: str
    join_token_id: str
    sha256: str


class NodeCredentials:
    """The credentials of the nodes joined to one control plane."""

    def __init__(self, join_tokens: JoinTokens) -> None:
        self.join_tokens = join_tokens
        self._by_id: dict[str, _Credential] = {}
        self._id_of_node: dict[str, str] = {}

    def issue(self, node_id: str, join_token_id: str) -> str:
        """A new credential for ``node_id`` (its earlier one is revoked)."""
        self.revoke_node(node_id)
        cid, token, sha256 = bearer.new(PREFIX, 6)
        self._by_id[cid] = _Credential(node_id, join_token_id, sha256)
        self._id_of_node[node_id] = cid
        return token

    def node_of(self, token: str) -> str | None:
        """The node ``token`` is the credential of, or None (unknown, revoked, malformed,
        or its join token revoked)."""
        parts = bearer.split(PREFIX, token)
        cred = self._by_id.get(parts[0]) if parts is not None else None
        if parts is None or cred is None or not bearer.same(cred.sha256, parts[1]):
            return None
        if cred.join_token_id not in self.join_tokens.ids():
            return None  # (``revoked_join_tokens`` forgets it and cuts its agent off)
        return cred.node_id

    def revoke_node(self, node_id: str) -> bool:
        cid = self._id_of_node.pop(node_id, None)
        if cid is None:
            return False
        del self._by_id[cid]
        return True

    def revoked_join_tokens(self) -> list[str]:
        """Revoke the credentials whose join token is gone; the nodes they belonged to."""
        valid = self.join_tokens.ids()
        gone = [c.node_id for c in self._by_id.values() if c.join_token_id not in valid]
        for node_id in gone:
            self.revoke_node(node_id)
        return gone
