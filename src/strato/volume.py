"""``strato.volume``: Modal's module path of ``Volume`` (``from modal.volume import
FileEntry`` in ported code)."""

from strato.sdk.volume import FileEntry, FileEntryType, Volume

__all__ = ["FileEntry", "FileEntryType", "Volume"]
