"""``strato.call_graph``: Modal's module path of ``InputInfo`` and ``InputStatus``
(``from modal.call_graph import InputInfo`` in ported code)."""

from strato.sdk.call_graph import InputInfo, InputStatus

__all__ = ["InputInfo", "InputStatus"]
