"""Weight layouts the kernels expect, produced from torch's layout once per weight version."""

from __future__ import annotations

import threading
import weakref

import torch

# id(weight) -> (weak reference to it, (version, data pointer, block), packed copy)
_packed: dict[int, tuple[weakref.ref, tuple[int, int, int], torch.Tensor]] = {}
_packed_lock = threading.Lock()


def block_out_channels(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(O, *rest) -> (O // block, *rest, block): output channels blocked for one SIMD register."""
    weight = weight.detach()
    if block == 1:
        return weight.contiguous().unsqueeze(-1)
    blocked = weight.reshape(weight.shape[0] // block, block, *weight.shape[1:])
    return blocked.movedim(1, -1).contiguous()


def _forget(key: int) -> None:
    with _packed_lock:
        _packed.pop(key, None)


def packed_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``block_out_channels``, memoized per tensor until the tensor is modified in place.

    ``_version`` changes on every in-place write (an optimizer step, ``load_state_dict``), so a module's
    weight is packed once, not on every call, and never goes stale.  Tensors compare elementwise, so the
    memo is keyed by identity and forgets a tensor when it is garbage collected.
    """
    key, stamp = id(weight), (weight._version, weight.data_ptr(), block)
    hit = _packed.get(key)  # a single dict read is atomic; the lock orders the writers
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    packed = block_out_channels(weight, block)
    with _packed_lock:
        _packed[key] = (weakref.ref(weight, lambda _, key=key: _forget(key)), stamp, packed)
    return packed
