"""Peak tensor memory on CPU, without an allocator that keeps statistics.

Method: :class:`LiveTensorMemory` is a ``TorchDispatchMode``. Every ATen
operator run inside it (forward and backward; the autograd engine runs CPU
backward on the calling thread and carries the mode with it) returns its
output tensors through the mode. For each output whose storage is new (neither
already tracked nor the storage of one of the operator's inputs, which rules out
views and in-place results of tensors made outside the context) the mode adds
``storage.nbytes()`` to a live counter and attaches a ``weakref`` callback to the
storage's Python object that subtracts it again. PyTorch preserves a storage's
Python object for as long as the C++ storage lives (even when only autograd's
saved-tensor references hold it), so the callback fires exactly when the
memory is released. ``peak`` is the maximum of the counter.

What it counts: bytes of tensor storages created inside the context and still
alive (activations saved for backward, gradients, temporaries). What it leaves
out: tensors created before entering (inputs, parameters), allocator slack and
fragmentation, and scratch memory that kernels allocate internally without
making a tensor (e.g. MKL/oneDNN workspaces).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorMemory", "measure_peak"]


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    found = []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf.untyped_storage())
    return found


class LiveTensorMemory(TorchDispatchMode):
    """Track live bytes of tensor storages allocated inside the context.

    Attributes:
        live: bytes currently alive (allocated inside the context).
        peak: the largest value ``live`` reached.
        total: bytes allocated in all (a measure of memory traffic).

    Example::

        with LiveTensorMemory() as mem:
            model(x).sum().backward()
        print(mem.peak)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.total = 0
        self._tracked: dict[int, tuple[weakref.ref, list[int]]] = {}

    def _release(self, key: int, size: list[int]) -> None:
        self.live -= size[0]
        self._tracked.pop(key, None)

    def _track(self, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        key = id(storage)
        entry = self._tracked.get(key)
        if entry is not None:
            if entry[1][0] != nbytes:  # resized in place (e.g. an ``out=`` argument)
                self.live += nbytes - entry[1][0]
                self.total += max(nbytes - entry[1][0], 0)
                entry[1][0] = nbytes
            return
        if nbytes == 0:
            return
        size = [nbytes]
        ref = weakref.ref(storage, lambda _, key=key, size=size: self._release(key, size))
        self._tracked[key] = (ref, size)
        self.live += nbytes
        self.total += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(s) for s in _storages((args, kwargs))}
        out = func(*args, **kwargs)
        for storage in _storages(out):
            if id(storage) in self._tracked or id(storage) not in inputs:
                self._track(storage)
        self.peak = max(self.peak, self.live)
        return out


def measure_peak(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn`` once inside :class:`LiveTensorMemory`.

    Returns:
        ``{"peak": ..., "end": ..., "total": ...}`` in bytes; ``end`` is what is
        still alive when ``fn`` returns (its result included).
    """
    with LiveTensorMemory() as mem:
        result = fn()
        end = mem.live
    del result
    return {"peak": mem.peak, "end": end, "total": mem.total}
