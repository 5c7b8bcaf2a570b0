"""Wire types of workspaces and their API tokens. Re-exported by
``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

WorkspaceName = Annotated[str, Meta(min_length=1, max_length=48)]
TokenRole = Annotated[str, Meta(max_length=16)]


class CreateWorkspace(msgspec.Struct):
    name: WorkspaceName


class WorkspaceInfo(msgspec.Struct):
    name: str
    created_at: float


class WorkspaceList(msgspec.Struct):
    workspaces: list[WorkspaceInfo]


class CreateToken(msgspec.Struct):
    role: TokenRole = "developer"  # admin | developer | read-only
    name: Annotated[str, Meta(max_length=64)] = ""


class TokenInfo(msgspec.Struct):
    token_id: str
    workspace: str
    role: str
    name: str
    created_at: float
    revoked: bool


class TokenList(msgspec.Struct):
    tokens: list[TokenInfo]


class NewToken(msgspec.Struct):
    info: TokenInfo
    token: str  # shown once: only its hash is kept


class WhoAmI(msgspec.Struct):
    workspace: str
    role: str
    operator: bool
    token_id: str | None
