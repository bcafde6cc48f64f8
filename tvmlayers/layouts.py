"""Weight layouts the kernels expect, produced from torch's layout once per weight version."""

from __future__ import annotations

import threading
import weakref

import torch
from torch.nn import Parameter

from .reference import block_out_channels

__all__ = ["TrackedParameter", "block_out_channels", "packed_weight", "refresh_weights", "track_data_writes"]

# id(weight) -> (weak reference to it, (version, data pointer, block), packed copy)
_packed: dict[int, tuple[weakref.ref, tuple[int, int, int], torch.Tensor]] = {}
_packed_lock = threading.Lock()


# How many ``.data`` assignments TrackedParameters have seen: such an assignment may change a weight's shape,
# dtype or device, which decide a module's plan, so the modules' plan memos (``tvmlayers.nn._base``) compare it.
data_assignments = 0


class TrackedParameter(Parameter):
    """The ``weight`` of the tvmlayers modules: a ``Parameter`` whose ``.data`` is ``detach()``.

    torch gives ``p.data`` a version counter of its own, so ``p.data.zero_()`` (EMA updates, weight
    clipping, old init code) leaves ``p._version`` unchanged and the packed copy, memoized per version,
    would go stale.  ``detach()`` shares the version counter, so such writes are seen like any in-place
    write.  The autograd consequence is torch's for in-place writes: a ``.data`` write between a forward
    that saved the weight and its backward raises at backward instead of silently using the new values.

    Only weights are tracked: the bias is read on every call, it has no packed copy to go stale, and each
    attribute read of a ``Parameter`` subclass costs about 0.1 us more than of a ``Parameter`` (torch
    looks up ``__torch_function__`` on every access to any tensor class but its own two).
    """

    @property
    def data(self) -> torch.Tensor:
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        global data_assignments
        torch._C.TensorBase.data.__set__(self, value)
        data_assignments += 1
        # a new version is what tells packed_weight that the storage changed (it skips data_ptr for us)
        torch.autograd.graph.increment_version(self)

    def __repr__(self) -> str:
        # torch's repr of a Parameter subclass names the subclass twice; print what nn.Conv2d prints
        return Parameter.__repr__(torch.Tensor._make_subclass(Parameter, self.detach(), self.requires_grad))


def track_data_writes(param: Parameter | None) -> None:
    """Make a plain ``Parameter`` a ``TrackedParameter`` in place, keeping its identity (weight tying,
    optimizers holding it).  Other ``Parameter`` subclasses are left as they are: call
    ``refresh_weights`` after their ``.data`` writes."""
    if type(param) is Parameter:
        param.__class__ = TrackedParameter


def _forget(key: int) -> None:
    with _packed_lock:
        _packed.pop(key, None)


def packed_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``block_out_channels``, memoized per tensor until the tensor is modified in place.

    ``_version`` changes on every in-place write torch sees (an optimizer step, ``load_state_dict``,
    ``weight.mul_()``, and on a ``TrackedParameter`` also ``weight.data.mul_()``), and ``data_ptr`` when
    ``weight.data = t`` gives it a new storage, so a weight is packed once, not on every call.  Tensors
    compare elementwise, so the memo is keyed by identity and forgets a tensor when it is garbage collected.

    Writes torch cannot see leave the packed copy stale until ``refresh_weights`` is called: through a
    numpy view (``weight.detach().numpy()``), DLPack or a raw data pointer, ``weight.data.<op>_()`` on a
    plain tensor or ``Parameter`` (its ``.data`` has a version counter of its own), and in-place writes to
    a weight made under ``torch.inference_mode()`` (such a tensor has no version counter at all).
    """
    # A TrackedParameter's .data setter bumps the version: its data_ptr() (0.23 us, a third of it for any
    # other tensor) need not be read
    try:
        pointer = 0 if type(weight) is TrackedParameter else weight.data_ptr()
        version = weight._version
    except RuntimeError:  # a tensor made under torch.inference_mode() has no version counter
        pointer, version = weight.data_ptr(), -1
    key, stamp = id(weight), (version, pointer, block)
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
