"""What the O(T)-memory tests of the torch forms measure: the tensors ops create."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Inside the mode: `largest`, the most elements of any tensor an op creates, and `peak`,
    the most bytes of storages created in it that were alive at once (freed when the storage
    dies: torch keeps one Python object per live storage, so a finalizer on it fires exactly
    when the memory is released)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.largest = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            self.largest = max(self.largest, t.numel())
            storage = t.untyped_storage()
            if id(storage) in self._seen:
                continue
            self._seen.add(id(storage))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out
