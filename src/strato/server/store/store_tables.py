"""What the table mixins of `Store` (:class:`~.store_calls.StoreCalls`,
:class:`~.store_apps.StoreApps`) use of it: its prepared statements and its writer
plumbing, declared here for the type checker (``Store.__init__`` sets them up), and
`run_statement`, a write of one statement."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection

from .writer import Write

if TYPE_CHECKING:
    from .store import _Statements

T = TypeVar("T")


def run_statement(stmt: Any) -> Callable[[Connection], None]:
    """A write (for ``Store._write``) that executes ``stmt``."""

    def run(c: Connection) -> None:
        c.execute(stmt)

    return run


class StoreTables:
    """A base of the table mixins of ``Store``."""

    # set up by Store.__init__
    q: _Statements

    if TYPE_CHECKING:  # Store's writer plumbing

        def _write(
            self,
            name: str,
            run: Callable[[Connection], T],
            recover: Callable[[Connection, BaseException], T] | None = None,
            journal_seq: int = 0,
            linger: bool = False,
        ) -> Write[T]: ...

        def _write_many(self, name: str, stmt: Any, params: list[dict]) -> Write[None]: ...

        def _done(self, name: str) -> Write[None]: ...

        def _read(self, run: Callable[[Connection], T]) -> T: ...
