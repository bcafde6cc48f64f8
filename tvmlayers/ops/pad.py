"""2-D padding of an NCHW (or channel-blocked NCHW[x]c) tensor, as a tensor expression, in torch's four padding
modes."""

from __future__ import annotations

from tvm import te, tirx


def _source_index(i: tirx.Expr, pad_before: int, size: int, mode: str) -> tirx.Expr:
    """Where padded position ``i`` reads from in an input dimension of ``size`` elements."""
    j = i - pad_before
    if mode == "reflect":  # mirror without repeating the edge: -1 -> 1, size -> size - 2
        j = tirx.Select(j < 0, -j, j)
        return tirx.Select(j >= size, 2 * (size - 1) - j, j)
    if mode == "replicate":
        return tirx.max(tirx.min(j, size - 1), 0)
    if mode == "circular":
        return tirx.floormod(j, size)
    raise ValueError(f"unknown padding mode {mode!r}")


def pad2d_compute(data: te.Tensor, padding: tuple[int, int, int, int], mode: str) -> te.Tensor:
    """Pad dimensions 2 and 3 (an NCHW tensor's last two, an NCHW[x]c one's before the channel block) by (top,
    left, bottom, right); mode is a torch padding_mode."""
    top, left, bottom, right = padding
    if not any(padding):
        return data
    n, c, h, w, *block = (int(d) for d in data.shape)
    shape = (n, c, h + top + bottom, w + left + right, *block)
    if mode == "zeros":
        zero = tirx.const(0, data.dtype)

        def value(b, ch, y, x, *lane):
            inside = tirx.all(y >= top, y < top + h, x >= left, x < left + w)
            return tirx.if_then_else(inside, data[(b, ch, y - top, x - left, *lane)], zero)

        return te.compute(shape, value, name="pad")
    return te.compute(
        shape,
        lambda b, ch, y, x, *lane: data[
            (b, ch, _source_index(y, top, h, mode), _source_index(x, left, w, mode), *lane)
        ],
        name="pad",
    )
