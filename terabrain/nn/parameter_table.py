"""Values kept beside tensors, by identity: what a parameter's gradient listener is
(terabrain.nn.gradient_blocks), where its last gradient's memory is
(terabrain.nn.gradient_buffers). An entry goes when its tensor does.

Not a ``weakref.WeakKeyDictionary``: that compares keys with ``==``, which for tensors is
elementwise.
"""

from __future__ import annotations

import weakref
from typing import Generic, Optional, TypeVar

import torch

Value = TypeVar("Value")


class ParameterTable(Generic[Value]):
    def __init__(self):
        # id(tensor) -> (a weak reference to it, its value)
        self._entries: dict[int, tuple[weakref.ref, Value]] = {}

    def get(self, tensor: torch.Tensor) -> Optional[Value]:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def set(self, tensor: torch.Tensor, value: Value) -> None:
        key = id(tensor)
        self._entries[key] = (weakref.ref(tensor, lambda _: self._entries.pop(key, None)), value)

    def remove(self, tensor: torch.Tensor) -> None:
        if self.get(tensor) is not None:
            del self._entries[id(tensor)]
