"""``strato.functions``: Modal's module path of ``Function`` and ``FunctionCall``
(``from modal.functions import FunctionCall`` in ported code)."""

from strato.sdk.function import Function, FunctionCall

__all__ = ["Function", "FunctionCall"]
