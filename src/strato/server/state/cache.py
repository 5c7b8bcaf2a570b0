"""Recently read or written Dict entries, kept in the control plane's memory (on its
event loop), so that a read of a hot key, or of one just written, answers without a trip
to the store's writer thread.

Every change of a Dict goes through this control plane, so the cache stays exact: a
change forgets the keys it touches when it is queued, and a read (or a put, once
committed) fills the cache only if no other change of any Dict was queued between its
own queueing and its answer (``writes`` counts them). Entries past the TTL are never
served (the expiry loop deletes exactly those). Small values only, least recently used
dropped first.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_ENTRIES = 10_000
MAX_VALUE_BYTES = 64 << 10


class Cached:
    __slots__ = ("accessed_at", "blob", "value")

    def __init__(self, value: bytes | None, blob: str | None, accessed_at: float) -> None:
        self.value = value
        self.blob = blob
        self.accessed_at = accessed_at


class DictCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Cached] = OrderedDict()
        self.writes = 0  # changes queued so far (a read's fill checks none came between)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, dict_id: str, key_hash: str) -> Cached | None:
        entry = self._entries.get((dict_id, key_hash))
        if entry is not None:
            self._entries.move_to_end((dict_id, key_hash))
        return entry

    def fill(
        self,
        dict_id: str,
        key_hash: str,
        writes_then: int,
        value: bytes | None,
        blob: str | None,
        accessed_at: float,
    ) -> None:
        """Keep what a read found, unless a change was queued since the read was."""
        if writes_then != self.writes or (value is not None and len(value) > MAX_VALUE_BYTES):
            return
        self._entries[(dict_id, key_hash)] = Cached(value, blob, accessed_at)
        self._entries.move_to_end((dict_id, key_hash))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def changing(self, dict_id: str | None = None, key_hashes: list[str] | None = None) -> None:
        """A change is being queued: of these keys, of a whole Dict (``key_hashes`` None),
        or of any Dict (``dict_id`` None: forget entries at the change's end)."""
        self.writes += 1
        if dict_id is None:
            return
        if key_hashes is None:
            self.forget_dicts([dict_id])
            return
        for kh in key_hashes:
            self._entries.pop((dict_id, kh), None)

    def forget_dicts(self, dict_ids: list[str]) -> None:
        gone = set(dict_ids)
        for k in [k for k in self._entries if k[0] in gone]:
            del self._entries[k]
