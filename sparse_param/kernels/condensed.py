"""Condensed compute for constant fan-in Linear layers (Lasby et al., ICLR 2024).

A constant fan-in weight ``(out, in)`` with ``k`` active inputs per unit is held as a
dense ``(out, k)`` block of values plus an ``(out, k)`` int64 block of input indices. The
product ``y = x Wᵀ`` becomes a gather of the input columns, ``x[:, indices]`` of shape
``(batch, out, k)``, then a batched product with the values: ``k`` multiply-adds per
output instead of ``in``, with contiguous memory access (no CSR row pointers). The
gathered block is built in chunks of units so its size stays bounded.

Units with no active input (SRigL's ablated units) are not stored: their output is the
bias alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..structure import Structure, violation
from .linear import computed_pattern, computed_weight

CHUNK_ELEMENTS = 1 << 20  # gathered elements per chunk (4 MiB of float32)
SMALL_BATCH = 4  # up to this many rows of x, one gather over all units (no transpose)


def condense(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, indices, units)`` of a constant fan-in ``(out, in)`` weight.

    ``values`` ``(u, k)`` holds ``weight`` at the ``k`` active inputs of each of the
    ``u`` units that have any (``units``, int64 ``(u,)``, ascending), ``indices``
    ``(u, k)`` int64 their input columns, ascending within a row. Raises ``ValueError``
    when the active units do not all have the same fan-in, or there is none.
    """
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(
            f"condense: need a 2-D weight and a mask of its shape, got {tuple(weight.shape)} "
            f"and {tuple(mask.shape)}"
        )
    why = violation(mask, Structure("fan_in"))
    counts = mask.sum(1)
    units = counts.nonzero().flatten()
    if why is not None or not units.numel():
        raise ValueError(
            f"condense: the mask is not constant fan-in ({why or 'no unit is active'}); "
            f"sparsify with structure='fan_in'"
        )
    k = int(counts[units[0]])
    # Active columns first, in ascending order: a stable sort of the inverted mask.
    indices = (~mask[units]).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    return weight[units].gather(1, indices), indices, units


def _step(units: int, batch: int, k: int) -> int:
    """Units per chunk, so one gathered ``(units, k, batch)`` block has about
    ``CHUNK_ELEMENTS`` elements."""
    return max(1, min(units, CHUNK_ELEMENTS // max(1, batch * k)))


class _CondensedProduct(torch.autograd.Function):
    """``x (b, in), values (u, k), indices (u, k) -> (b, u)``: ``Σ_j x[:, idx[o, j]] ·
    values[o, j]``, and its exact gradients for ``x`` and ``values``.

    Few rows (``b <= SMALL_BATCH``, online inference): one ``index_select`` of the input
    columns, ``(b, u·k)``, times the values, summed over ``k``. More rows: work on ``xᵀ``
    ``(in, b)``, whose gathered rows form a contiguous ``(u, k, b)`` block, in chunks of
    units that stay in cache, each one batched product ``(u, 1, k) @ (u, k, b)``. The
    gradients are the same gathers and an ``index_add_`` back into the input.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, values, indices)
        (b, _), (u, k) = x.shape, values.shape
        if b <= SMALL_BATCH:
            return (x.index_select(1, indices.flatten()).view(b, u, k) * values).sum(-1)
        xt = x.t().contiguous()
        out = x.new_empty(u, b)
        step = _step(u, b, k)
        for start in range(0, u, step):
            rows = slice(start, start + step)
            gathered = xt.index_select(0, indices[rows].flatten()).view(-1, k, b)
            torch.bmm(values[rows, None, :], gathered, out=out[rows, None, :])
        return out.t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: D102
        x, values, indices = ctx.saved_tensors
        (b, _), (u, k) = x.shape, values.shape
        want_x, want_values = ctx.needs_input_grad[:2]
        if b <= SMALL_BATCH:
            flat = indices.flatten()
            grad_values = grad_x = None
            if want_values:
                gathered = x.index_select(1, flat).view(b, u, k)
                grad_values = (grad[:, :, None] * gathered).sum(0)
            if want_x:
                contrib = (grad[:, :, None] * values).view(b, -1)
                grad_x = torch.zeros_like(x).index_add_(1, flat, contrib)
            return grad_x, grad_values, None
        xt = x.t().contiguous()
        grad_t = grad.t().contiguous()  # (u, b)
        grad_xt = torch.zeros_like(xt) if want_x else None
        grad_values = torch.empty_like(values) if want_values else None
        step = _step(u, b, k)
        for start in range(0, u, step):
            rows = slice(start, start + step)
            flat = indices[rows].flatten()
            g = grad_t[rows, :, None]  # (units in chunk, b, 1)
            if grad_values is not None:
                gathered = xt.index_select(0, flat).view(-1, k, b)
                torch.bmm(gathered, g, out=grad_values[rows, :, None])
            if grad_xt is not None:
                contrib = values[rows, :, None] * g.transpose(1, 2)  # (units, k, b)
                grad_xt.index_add_(0, flat, contrib.flatten(0, 1))
        return None if grad_xt is None else grad_xt.t(), grad_values, None


def condensed_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    units: Tensor | None = None,
    out_features: int | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``y = x Wᵀ + b`` for the condensed weight ``(values, indices, units)`` of
    :func:`condense`: ``x`` ``(*, in)`` → ``(*, out_features)``. ``units=None``: every unit
    is stored (``out_features = values.shape[0]``). Differentiable in ``x``, ``values``
    and ``bias``, exactly as the masked dense product (up to float summation order)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    y = _CondensedProduct.apply(flat, values, indices)
    if units is not None and (out_features is None or units.numel() != out_features):
        full = y.new_zeros(flat.shape[0], values.shape[0] if out_features is None else out_features)
        y = full.index_copy(1, units, y)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


class CondensedLinear(nn.Module):
    """A Linear layer with a constant fan-in weight stored condensed.

    Parameters ``values`` ``(u, k)`` and ``bias`` ``(out,)``; buffers ``indices``
    ``(u, k)`` int64 and ``units`` ``(u,)`` int64 (units with any active input). Forward
    and backward run on the condensed block only (see :func:`condensed_linear`), so it
    trains too, with a fixed topology. ``weight`` materializes the dense ``(out, in)``
    weight (zeros off the pattern), for code that reads it.
    """

    indices: Tensor
    units: Tensor

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        values, indices, units = condense(weight.detach(), mask)
        self.values = nn.Parameter(values.clone())
        self.register_buffer("indices", indices)
        self.register_buffer("units", units)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, module: nn.Module) -> CondensedLinear:
        """From an ``nn.Linear`` sparsified with ``structure="fan_in"`` (or any Linear
        whose non-zero pattern is constant fan-in); the module is unchanged."""
        return cls(computed_weight(module), computed_pattern(module), module.bias)

    @property
    def fan_in(self) -> int:
        """Active inputs per stored unit (k)."""
        return self.values.shape[1]

    @property
    def weight(self) -> Tensor:
        dense = self.values.new_zeros(self.out_features, self.in_features)
        return dense.index_put((self.units[:, None], self.indices), self.values)

    def forward(self, x: Tensor) -> Tensor:
        return condensed_linear(
            x, self.values, self.indices, self.units, self.out_features, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fan_in={self.fan_in}, units={self.units.numel()}, bias={self.bias is not None}"
        )
