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

    ``_version`` changes on every in-place write torch sees (an optimizer step, ``load_state_dict``,
    ``weight.mul_()``, and on the modules' parameters also ``weight.data.mul_()``, see
    ``tvmlayers.nn._base.TrackedParameter``), so a weight is packed once, not on every call.  Tensors
    compare elementwise, so the memo is keyed by identity and forgets a tensor when it is garbage collected.

    Writes torch cannot see leave the packed copy stale until ``refresh_weights`` is called: through a
    numpy view (``weight.detach().numpy()``), DLPack or a raw data pointer, and ``weight.data.<op>_()``
    on a plain tensor passed to ``tvmlayers.functional`` (its ``.data`` has a version counter of its own).
    """
    key, stamp = id(weight), (weight._version, weight.data_ptr(), block)
    hit = _packed.get(key)  # a single dict read is atomic; the lock orders the writers
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    packed = block_out_channels(weight, block)
    with _packed_lock:
        _packed[key] = (weakref.ref(weight, lambda _, key=key: _forget(key)), stamp, packed)
    return packed


def refresh_weights(source: torch.nn.Module | torch.Tensor) -> None:
    """Repack on their next use the weights of ``source``: a model (all its parameters) or one tensor.

    Only needed after writes torch cannot see (see ``packed_weight``): through a numpy view, DLPack or a
    raw data pointer, or ``weight.data.<op>_()`` on a plain tensor given to ``tvmlayers.functional``.
    """
    tensors = source.parameters() if isinstance(source, torch.nn.Module) else (source,)
    for tensor in tensors:
        _forget(id(tensor))
