"""Receptive field of a stack of windowed layers (convolutions and pools), by the standard recurrences.

For each layer with kernel ``k``, stride ``s``, dilation ``d`` and padding before the input ``p_lo``
(``k_eff = d * (k - 1) + 1``), starting from the input (``size 1, jump 1, start 0``)::

    jump_out  = jump_in * s
    size_out  = size_in + (k_eff - 1) * jump_in
    start_out = start_in + ((k_eff - 1) / 2 - p_lo) * jump_in

``size`` is the receptive field (in input pixels) of one output cell, ``jump`` the distance in input pixels
between neighbouring output cells, ``start`` the input coordinate of the centre of the first output cell's
receptive field (pixel centres at 0, 1, 2, ...; negative when it lies in the padding).
"""

from __future__ import annotations

from typing import Sequence, Union

IntOrPair = Union[int, tuple[int, int]]
LayerSpec = tuple[str, IntOrPair, IntOrPair, IntOrPair, IntOrPair]


def _as_pair(value: IntOrPair, what: str, layer: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"layer {layer!r}: {what} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def receptive_field_of_layers(layers: Sequence[LayerSpec]) -> list[dict]:
    """Receptive field after each layer of a stack.

    Args:
      layers: ``(name, kernel, stride, dilation, padding_lo)`` per layer, in order from the input; each number an
        int, or an ``(h, w)`` pair for non-square layers. Layers that do not change the geometry (norms,
        activations) can be left out; a 1x1 stride-1 layer changes nothing.
    Returns:
      One dict per layer: ``{'name', 'size', 'jump', 'start'}``. The values are numbers when every given value
      is an int, ``(h, w)`` tuples when any layer was given a pair.
    """
    rows = []
    size, jump, start = [1, 1], [1, 1], [0.0, 0.0]
    square = True
    for spec in layers:
        if len(spec) != 5:
            raise ValueError(f"each layer must be (name, kernel, stride, dilation, padding_lo), got {spec!r}")
        name, kernel, stride, dilation, pad = spec
        square = square and all(isinstance(v, int) for v in (kernel, stride, dilation, pad))
        k, s = _as_pair(kernel, "kernel", name, 1), _as_pair(stride, "stride", name, 1)
        d, p = _as_pair(dilation, "dilation", name, 1), _as_pair(pad, "padding_lo", name, 0)
        for axis in range(2):
            k_eff = d[axis] * (k[axis] - 1) + 1
            start[axis] = start[axis] + ((k_eff - 1) / 2 - p[axis]) * jump[axis]
            size[axis] = size[axis] + (k_eff - 1) * jump[axis]
            jump[axis] = jump[axis] * s[axis]
        rows.append({"name": name, "size": tuple(size), "jump": tuple(jump), "start": tuple(start)})
    if square:
        for row in rows:
            row.update(size=row["size"][0], jump=row["jump"][0], start=row["start"][0])
    return rows


__all__ = ["LayerSpec", "receptive_field_of_layers"]
