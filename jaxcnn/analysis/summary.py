"""Per-layer summary of a model: output shapes, parameters, FLOPs and receptive fields, checked against XLA.

    table = summary(create_model("lenet5"), (1, 28, 28, 1))
    print(table)                 # a fixed-width table; table.to_markdown() for reports
    table.total_params           # 61706
    table.total_flops, table.xla_flops

Nothing is computed on real data: the model is initialised and traced with `jax.eval_shape`, every module call is
seen through `flax.linen.intercept_methods`, and XLA's count comes from compiling (not running) the forward pass.

What is counted:
- **params**: the module's own entries of the ``params`` collection (BatchNorm running statistics are reported
  apart, as ``total_state``).
- **FLOPs**: ``2 x MACs`` of every convolution and dense layer (a multiply and an add per kernel weight per
  output position; grouped convs count their smaller kernels), the usual convention, in which the zeros of the
  padding are multiplied too. Biases, norms, activations and pooling are not counted.
- **FLOPs without padding**: the same, counting only the kernel taps that land inside the input. XLA counts
  convolutions this way, so `xla_flops` is compared with this total (XLA also counts the elementwise work: a
  few percent more; with ``dtype='bfloat16'`` it also counts the cast of every weight, which is large for
  the dense layers of VGG and AlexNet). On small padded maps the difference is real: ResNet-20 on 32x32 does
  7% fewer multiply-adds than the usual count says.
- **receptive field** (conv and pool rows): the size and jump (distance between neighbouring output cells), in
  input pixels, along the path with the largest field (`jaxcnn.analysis.receptive_field.receptive_field_of_layers`
  on the chain of windowed layers that leads there). Parallel branches (Inception) and shortcuts are followed by
  array identity where possible, else by the latest output of the same shape.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn import backends
from jaxcnn.analysis.receptive_field import receptive_field_of_layers
from jaxcnn.nn import functional as F
from jaxcnn.nn import layers

Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One call of a leaf module (a module that calls no other module)."""

    path: str  # e.g. 'stage1_block1/conv1'
    type: str  # the module's class name
    output_shape: tuple[int, ...]
    params: int
    flops: int  # 2 x MACs for conv and dense layers, else 0
    flops_unpadded: int  # the same without the kernel taps that fall in the padding (what XLA counts)
    rf_size: Pair | None = None  # receptive field (h, w) in input pixels, for conv and pool layers
    rf_jump: Pair | None = None  # distance between neighbouring output cells in input pixels


@dataclasses.dataclass(frozen=True)
class SummaryTable:
    """The rows in call order, the totals, and XLA's FLOP count of the compiled forward pass."""

    model: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rows: tuple[LayerRow, ...]
    total_params: int
    total_state: int  # non-trainable variables (BatchNorm running statistics)
    total_flops: int  # sum of the rows' analytic FLOPs
    total_flops_unpadded: int  # sum of the rows' FLOPs without padding taps
    xla_flops: float | None  # from jax.jit(forward).lower(...).compile().cost_analysis(); None if unavailable

    @property
    def xla_ratio(self) -> float | None:
        """XLA's FLOPs over the analytic total without padding taps (a little above 1: XLA also counts the
        elementwise work)."""
        if not self.xla_flops or not self.total_flops_unpadded:
            return None
        return self.xla_flops / self.total_flops_unpadded

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["layer", "type", "output shape", "params", "FLOPs", "RF", "jump"]
        body = [
            [r.path, r.type, _shape(r.output_shape), f"{r.params:,}" if r.params else "", _si(r.flops),
             _pair(r.rf_size), _pair(r.rf_jump)]
            for r in self.rows
        ]
        xla = "n/a" if self.xla_flops is None else _si(self.xla_flops)
        if self.xla_ratio is not None:
            xla += f" ({(self.xla_ratio - 1) * 100:+.1f}%)"
        totals = [
            f"model {self.model}, input {_shape(self.input_shape)} -> {_shape(self.output_shape)}",
            f"params {self.total_params:,} (+ {self.total_state:,} non-trainable state)",
            (f"FLOPs (2 x MACs of conv/dense) {_si(self.total_flops)}, {_si(self.total_flops_unpadded)} without "
             f"padding taps; XLA {xla}"),
        ]
        return header, body, totals

    def to_text(self) -> str:
        header, body, totals = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        right = {3, 4, 5, 6}

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *(line(r) for r in body), rule, *totals])

    def to_markdown(self) -> str:
        header, body, totals = self._cells()
        out = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(out + [""] + [f"- {t}" for t in totals])

    def __str__(self) -> str:
        return self.to_text()


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _pair(p: Pair | None) -> str:
    if p is None:
        return ""
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def _si(n: float) -> str:
    if not n:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def _as_pair(v: Any) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window_spec(
    module: nn.Module, x_shape: Sequence[int], pool_window: Any = None
) -> tuple[Pair, Pair, Pair, Pair] | None:
    """(kernel, stride, dilation, padding before) of a conv or pool layer, else None.

    ``pool_window`` is the ``max_pool_window`` a BatchNorm was called with: its output is then max-pooled over
    non-overlapping windows without padding, a pool layer as far as the receptive field goes.
    """
    if pool_window is not None:
        kernel = _as_pair(pool_window)
        return kernel, kernel, (1, 1), (0, 0)
    if isinstance(module, layers.Conv2d):
        kernel, stride, dilation = _as_pair(module.kernel_size), _as_pair(module.strides), _as_pair(module.dilation)
        padding = module.padding
    elif isinstance(module, layers.Pool2d):
        kernel = _as_pair(module.window_shape if module.window is None else module.window)
        stride = kernel if module.strides is None else _as_pair(module.strides)
        dilation, padding = (1, 1), module.padding
    else:
        return None
    pads = F.resolve_padding(padding, kernel, dilation, strides=stride, input_size=tuple(x_shape[1:3]))
    return kernel, stride, dilation, (pads[0][0], pads[1][0])


def _taps_inside(size: int, out: int, kernel: int, stride: int, dilation: int, pad_lo: int) -> int:
    """Along one axis: the (output cell, kernel tap) pairs whose input cell lies inside the input."""
    return sum(
        1 for i in range(out) for a in range(kernel) if 0 <= i * stride + a * dilation - pad_lo < size
    )


def _accepts_train(model: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False


def flops_from_cost_analysis(analysis: Any) -> float | None:
    """The 'flops' entry of a `cost_analysis()` result: a dict, or (older jax) a list of one dict per program."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _xla_flops(forward: Any, *abstract_args: Any) -> float | None:
    """XLA's FLOP count of `forward` compiled (not run) for the given abstract arguments."""
    try:
        with backends.xla_kernels():  # XLA's cost analysis counts nothing inside the backend's native kernels
            analysis = jax.jit(forward).lower(*abstract_args).compile().cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis: the table is still useful without it)
        return None
    return flops_from_cost_analysis(analysis)


def summary(
    model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, xla: bool = True
) -> SummaryTable:
    """The per-layer table of `model` on inputs of `input_shape`.

    Args:
      model: a flax module called as ``model.apply(variables, x[, train=False])`` (every jaxcnn model).
      input_shape: ``(N, H, W, C)``, or ``(H, W, C)`` with ``batch_size`` examples.
      xla: also compile the forward pass and read XLA's FLOP count (False skips it: large models compile slowly).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (batch_size, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (N, H, W, C) or (H, W, C) with positive sizes, got {tuple(input_shape)}")
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    kwargs = {"train": False} if _accepts_train(model) else {}
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(lambda x: model.init({"params": key, "dropout": key}, x, **kwargs), x)
    params = variables.get("params", {})

    def forward(variables: Any, x: jax.Array) -> Any:
        return model.apply(variables, x, **kwargs)

    calls: list[dict[str, Any]] = []  # every module call, in call order
    open_calls: list[dict[str, Any]] = []  # the calls under way, outermost first
    trace = _RFTracker()

    def interceptor(next_fun: Any, args: Any, kw: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not module.path:
            return next_fun(*args, **kw)
        record = {"module": module, "leaf": True}
        calls.append(record)
        if open_calls:
            open_calls[-1]["leaf"] = False
        open_calls.append(record)
        start = trace.mark()
        result = next_fun(*args, **kw)
        open_calls.pop()
        x_in = args[0] if args else None
        # A conv called with split_bias returns (output without bias, bias): the output is the layer's map.
        out = result[0] if isinstance(result, tuple) and kw.get("split_bias") else result
        record["passthrough"] = out is x_in  # identity shortcuts, dropout at evaluation
        # max_pool_window: a BatchNorm that also max-pools its output
        record["rf"] = trace.module_output(module, x_in, out, start, kw.get("max_pool_window"))
        record["input_shape"] = tuple(x_in.shape) if hasattr(x_in, "shape") else None
        record["output_shape"] = tuple(out.shape) if hasattr(out, "shape") else None
        return result

    def traced(variables: Any, x: jax.Array) -> Any:
        trace.start(x)
        with nn.intercept_methods(interceptor):
            return forward(variables, x)

    output = jax.eval_shape(traced, variables, x)

    rows, seen = [], set()
    for record in calls:
        if not record["leaf"] or record["passthrough"]:
            continue
        module = record["module"]
        path = tuple(str(p) for p in module.path)
        own = _subtree(params, path)
        own = {k: v for k, v in own.items() if hasattr(v, "shape")} if isinstance(own, dict) else {}
        n = 0 if path in seen else sum(math.prod(v.shape) for v in own.values())
        seen.add(path)
        out_shape = record["output_shape"] or ()
        flops = unpadded = 0
        if "kernel" in own and out_shape:
            flops = unpadded = 2 * math.prod(out_shape[:-1]) * math.prod(own["kernel"].shape)
            spec = _window_spec(module, record["input_shape"]) if len(out_shape) == 4 else None
            if spec is not None:
                kernel, stride, dilation, pad_lo = spec
                taps = [_taps_inside(record["input_shape"][1 + i], out_shape[1 + i], kernel[i], stride[i],
                                     dilation[i], pad_lo[i]) for i in range(2)]
                cin_cout = own["kernel"].shape[2] * own["kernel"].shape[3]
                unpadded = 2 * out_shape[0] * taps[0] * taps[1] * cin_cout
        rf = record["rf"]
        rows.append(LayerRow(
            path="/".join(path), type=type(module).__name__, output_shape=out_shape, params=n, flops=flops,
            flops_unpadded=unpadded, rf_size=rf[0] if rf else None, rf_jump=rf[1] if rf else None,
        ))

    count = lambda tree: sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(tree))
    total_params = count(params)
    total_state = count({k: v for k, v in variables.items() if k != "params"})
    xla_flops = _xla_flops(forward, variables, x) if xla else None
    out_shape = tuple(output.shape) if hasattr(output, "shape") else ()
    return SummaryTable(
        model=type(model).__name__, input_shape=shape, output_shape=out_shape, rows=tuple(rows),
        total_params=total_params, total_state=total_state, total_flops=sum(r.flops for r in rows),
        total_flops_unpadded=sum(r.flops_unpadded for r in rows), xla_flops=xla_flops,
    )


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return {}
        tree = tree[p]
    return tree


class _RFTracker:
    """Receptive-field bookkeeping while the forward pass is traced.

    Each 4-D array a module returns gets a *chain*: the windowed layers (name, kernel, stride, dilation,
    padding before) from the input to it, along the path with the largest receptive field. A conv or pool extends
    its input's chain; any other module's output takes the largest-field chain among the arrays of its shape made
    during its call (the concatenated branches of an Inception module, the residual sum of a block).
    """

    def __init__(self) -> None:
        self.known: dict[int, tuple[Any, tuple]] = {}  # id(array) -> (array kept alive, state)
        self.recent: list[tuple[tuple[int, ...], tuple]] = []  # (shape, state) in creation order
        # A state is (chain, rf area): the area orders paths by field size without recomputing it.

    def start(self, x: Any) -> None:
        self._register(x, ((), 1))

    def mark(self) -> int:
        return len(self.recent)

    def _register(self, array: Any, state: tuple) -> None:
        self.known[id(array)] = (array, state)
        self.recent.append((tuple(array.shape), state))

    def _state_of(self, array: Any) -> tuple | None:
        hit = self.known.get(id(array))
        if hit is not None and hit[0] is array:
            return hit[1]
        # Made by an operation that is not a module (an activation, padding, a sum): the latest state of the
        # same shape, else of the same height and width, else the latest (padding shifts, it does not widen).
        shape = tuple(array.shape)
        for match in (lambda s: s == shape, lambda s: s[1:3] == shape[1:3], lambda s: True):
            for s, state in reversed(self.recent):
                if match(s):
                    return state
        return None

    def module_output(
        self, module: nn.Module, x: Any, out: Any, start: int, pool_window: Any = None
    ) -> tuple[Pair, Pair] | None:
        """Registers `out`'s chain; returns (rf size, rf jump) for conv and pool layers (and a BatchNorm that
        max-pools, ``pool_window``), else None."""
        if getattr(out, "ndim", None) != 4:
            return None
        state = self._state_of(x) if getattr(x, "ndim", None) == 4 else None
        spec = _window_spec(module, x.shape, pool_window) if state is not None else None
        if spec is not None:
            chain = state[0] + (("/".join(map(str, module.path)), *spec),)
            row = receptive_field_of_layers(list(chain))[-1]
            size, jump = _as_pair(row["size"]), _as_pair(row["jump"])
            self._register(out, (chain, size[0] * size[1]))
            return size, jump
        hw = tuple(out.shape[1:3])
        candidates = [st for s, st in self.recent[start:] if s[1:3] == hw]
        if state is not None and tuple(x.shape[1:3]) == hw:
            candidates.append(state)
        if candidates:
            self._register(out, max(candidates, key=lambda st: st[1]))
        return None


__all__ = ["LayerRow", "SummaryTable", "flops_from_cost_analysis", "summary"]
