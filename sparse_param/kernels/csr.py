"""Sparse compute for the Linear layers of a sparsified model: CSR kernels that follow the mask.

In the default ``"dense"`` mode every sparse layer multiplies with its masked weight,
zeros included. In ``"sparse"`` mode a Linear layer computes its forward and both
gradients from the active weights only, with stock PyTorch kernels::

    forward        y   = (W_csr @ x^T)^T + b              torch.sparse.mm
    input grad     dx  = (Wt_csr @ dy^T)^T                torch.sparse.mm, CSR of W^T
    weight grad    dW  = (dy^T @ x) at the mask's pattern torch.sparse.sampled_addmm

and writes ``dW`` into a dense ``.grad`` that is exactly zero at inactive positions, so
optimizers, DDP and the scheduler see what they see in dense mode. ``"auto"`` picks
sparse per layer where the calibration below says it is faster than dense.

The masking parametrization stays the single source of truth: the CSR indices
(:class:`CsrIndex`) are derived from ``mask`` and rebuilt only when it changes (a topology
update or ``load_state_dict`` writes it in place, which bumps its version counter);
the values are gathered from the stored weight on every forward. Checkpoints hold
nothing new. Writes to ``mask.data`` bypass the version counter and are not seen.

Steps that capture the dense gradient (``SparseMask.capture_dense_grad``: before a
RigL / GraNet update, every SNFS step) run the dense path, so the captured gradient
is exact; so do ``torch.compile`` traces and dtypes the kernels lack.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gradients import accumulates
from ..layers import is_sparse, sparse_layers
from ..mask import SparseMask
from .linear import linear_classes

COMPUTE_MODES = ("dense", "sparse", "auto")
_KERNEL_DTYPES = (torch.float32, torch.float64)  # dtypes of the CPU sparse kernels (MKL)

# Calibration of "auto" (benchmarks/README.md, "Calibration of auto"): a whole training
# step of one layer (forward, backward, SGD step) ran faster in sparse mode than in dense
# mode on this project's CPU at batch 32 to 512 wherever the weight had at least
# min_numel entries and a density at most max_density, for the thread count given (more
# threads: the last entry). Smaller layers lose to the fixed cost of the sparse calls;
# the dense GEMM gains more from a second thread than the sparse kernels do.
AUTO_RULES: dict[int, tuple[float, int]] = {1: (0.05, 500_000), 2: (0.05, 4_000_000)}


def auto_picks_sparse(shape: tuple[int, int], active: int, threads: int, device: str) -> bool:
    """Whether ``"auto"`` computes a Linear layer of weight ``shape`` (out, in) with
    ``active`` active weights sparsely, on ``threads`` CPU threads.

    Batch-independent by design: the decision is taken when the mask changes, not per
    input. Only CPU is calibrated; other devices stay dense.
    """
    max_density, min_numel = AUTO_RULES[min(max(threads, 1), max(AUTO_RULES))]
    numel = shape[0] * shape[1]
    # round(): the count sparsify gives a layer at exactly max_density still qualifies.
    return device == "cpu" and numel >= min_numel and active <= round(max_density * numel)


@dataclass(frozen=True)
class CsrIndex:
    """CSR indices of one mask of shape (out, in), with ``nnz`` active weights.

    ``index`` (nnz,) are the active positions of the flattened weight in row-major
    order, which is the order of W's CSR values; ``crow`` (out+1,) and ``col`` (nnz,)
    index W_csr. ``crow_t`` (in+1,), ``col_t`` (nnz,) index the CSR of W^T, whose
    values are W's values under the fixed permutation ``perm`` (nnz,).
    """

    key: tuple[int, int, str, int]
    sparse: bool  # computed sparsely (for "auto": the calibration's decision)
    index: Tensor
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor
    pattern: Tensor  # W's CSR pattern with float32 zeros, for sampled_addmm


def _index_of(mask: Tensor, key: tuple[int, int, str, int], sparse: bool) -> CsrIndex:
    rows, cols = mask.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    row, col = index // cols, index % cols
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = mask.sum(1).cumsum(0)
    perm = torch.argsort(col * rows + row)  # keys are distinct: a plain sort is exact
    crow_t = torch.zeros(cols + 1, dtype=torch.int64, device=mask.device)
    crow_t[1:] = mask.sum(0).cumsum(0)
    with warnings.catch_warnings():  # torch warns once per process that CSR is "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = _csr(crow, col, torch.zeros(index.numel(), device=mask.device), (rows, cols))
    return CsrIndex(key, sparse, index, crow, col, crow_t, row[perm], perm, pattern)


class SparseCompute:
    """Per-layer state of the sparse path, kept on the module as ``sparse_compute``.

    Not in the state dict: everything here is derived from the mask and rebuilt when
    the mask's version, storage, device or the thread count changes.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.builds = 0  # how many times the indices were built (tests read it)
        self._index: CsrIndex | None = None

    def indices_for(self, mask: Tensor) -> CsrIndex:
        """The CSR indices of ``mask``, rebuilt only if it changed since the last call."""
        key = (mask._version, mask.data_ptr(), str(mask.device), torch.get_num_threads())
        if self._index is None or self._index.key != key:
            active = int(mask.count_nonzero())
            sparse = self.mode == "sparse" or auto_picks_sparse(
                tuple(mask.shape), active, key[3], mask.device.type
            )
            self._index = _index_of(mask, key, sparse)
            self.builds += 1
        return self._index

    def __deepcopy__(self, memo: dict) -> SparseCompute:
        # A copy (an EMA model) has its own mask: it builds its own indices.
        return SparseCompute(self.mode)

    def __repr__(self) -> str:
        return f"SparseCompute(mode={self.mode!r}, builds={self.builds})"


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _CsrLinear(torch.autograd.Function):
    """``y = x W^T + b`` from W's active weights only; gradients likewise.

    Shapes: ``x`` (N, in) in the compute dtype; ``weight`` the stored weight (out, in);
    ``bias`` (out,) or None; returns (N, out). The weight gradient is dense (out, in),
    exactly zero where the mask is off.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, s: CsrIndex, owner: SparseMask
    ) -> Tensor:
        out_features, in_features = weight.shape
        # index_select, not [index]: measured 3x faster for this gather on CPU.
        values = weight.detach().reshape(-1).index_select(0, s.index).to(x.dtype)
        # Contiguous, as F.linear's output (callers may .view() it); the copy is N·out.
        out = torch.sparse.mm(_csr(s.crow, s.col, values, weight.shape), x.T).T.contiguous()
        if bias is not None:
            out += bias.to(x.dtype)
        ctx.save_for_backward(x, values)
        ctx.csr_index, ctx.owner, ctx.weight = s, owner, weight
        ctx.shape = (out_features, in_features)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # noqa: D102
        x, values = ctx.saved_tensors
        s: CsrIndex = ctx.csr_index
        out_features, in_features = ctx.shape
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            weight_t = _csr(
                s.crow_t, s.col_t, values.index_select(0, s.perm), (in_features, out_features)
            )
            grad_x = torch.sparse.mm(weight_t, grad.T).T
        if ctx.needs_input_grad[1]:
            pattern = s.pattern
            if pattern.dtype != x.dtype:
                pattern = _csr(s.crow, s.col, torch.zeros_like(values), ctx.shape)
            sampled = torch.sparse.sampled_addmm(pattern, grad.T, x, beta=0.0)
            grad_w = torch.zeros(ctx.shape, dtype=ctx.dtypes[0], device=x.device)
            grad_w.view(-1).index_copy_(0, s.index, sampled.values().to(ctx.dtypes[0]))
            if accumulates(ctx, 1):  # zero where inactive already: no masking pass
                ctx.owner.gradient.expect_exact(ctx.weight)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(ctx.dtypes[1])
        return grad_x, grad_w, grad_b, None, None


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype the sparse kernels run in, or None where the dense path must run."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.float32 if weight.dtype in (torch.float32, torch.bfloat16) else None
    return weight.dtype if x.dtype == weight.dtype and weight.dtype in _KERNEL_DTYPES else None


def _sparse_linear_forward(self: nn.Module, x: Tensor) -> Tensor:
    parametrizations = self.parametrizations.weight
    mask_param = parametrizations[0]
    dtype = _compute_dtype(x, parametrizations.original)
    if mask_param.capture_dense_grad or torch.compiler.is_compiling() or dtype is None:
        return F.linear(x, self.weight, self.bias)
    s = self.sparse_compute.indices_for(mask_param.mask)
    if not s.sparse:
        return F.linear(x, self.weight, self.bias)
    with torch.no_grad():
        self.weight  # noqa: B018  the parametrization re-zeroes a stored weight written since
    autocast = torch.is_autocast_enabled(x.device.type)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype  # as F.linear
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, self.in_features).to(dtype)
        out = _CsrLinear.apply(x2, parametrizations.original, self.bias, s, mask_param)
    return out.to(out_dtype).reshape(*x.shape[:-1], self.out_features)


def supports_compute_target(module: nn.Module) -> bool:
    """Whether ``module``'s forward is ``nn.Linear``'s (or timm's ``Linear``'s), which the
    sparse path replaces exactly once the module is sparse (subclasses with a forward
    of their own are left alone)."""
    return type(module).forward in {cls.forward for cls in linear_classes()}


def supports_sparse_compute(module: nn.Module) -> bool:
    """Whether ``module`` is a sparse layer that can take the sparse path."""
    return is_sparse(module) and supports_compute_target(module)


def set_compute(model: nn.Module, mode: str) -> list[str]:
    """Choose how the sparse Linear layers of ``model`` compute, in place.

    Args:
        model: a sparsified model (DDP / torch.compile wrappers are looked through).
        mode: ``"dense"`` (masked dense kernels, the default of :func:`sparsify`),
            ``"sparse"`` (CSR kernels for every sparse Linear layer) or ``"auto"``
            (CSR kernels where :func:`auto_picks_sparse` says they are faster, decided
            again whenever a layer's mask changes).

    Returns:
        The names of the layers that got the sparse path (empty for ``"dense"``).
        Convolutions and Linear subclasses with their own forward stay dense.

    Raises:
        ValueError: unknown ``mode``, a model without sparse layers, or ``"sparse"``
            / ``"auto"`` for a model without a sparse Linear layer; nothing is changed.
    """
    check_compute_mode(mode)
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("set_compute: the model has no sparse layers; call sparsify first")
    linear = [layer for layer in layers if supports_sparse_compute(layer.module)]
    if mode != "dense" and not linear:
        raise ValueError(
            f"set_compute: compute={mode!r} needs a sparse nn.Linear layer and the model has "
            f"none (convolutions always compute dense); use compute='dense'"
        )
    for layer in layers:
        remove_sparse_compute(layer.module)
    if mode == "dense":
        return []
    for layer in linear:
        layer.module.sparse_compute = SparseCompute(mode)
        layer.module.forward = types.MethodType(_sparse_linear_forward, layer.module)
    return [layer.name for layer in linear]


def remove_sparse_compute(module: nn.Module) -> None:
    """Give ``module`` back its class's forward (what :func:`set_compute` installed)."""
    if "sparse_compute" in module.__dict__:
        del module.__dict__["sparse_compute"]
        module.__dict__.pop("forward", None)


def compute_modes(model: nn.Module) -> dict[str, str]:
    """Name of every sparse layer to the kernels its next forward uses between dense-
    gradient captures: ``"sparse"`` or ``"dense"`` (``"auto"`` layers resolved)."""
    modes = {}
    for layer in sparse_layers(model):
        compute = layer.module.__dict__.get("sparse_compute")
        sparse = compute is not None and compute.indices_for(layer.mask).sparse
        modes[layer.name] = "sparse" if sparse else "dense"
    return modes


def check_compute_mode(mode: object) -> None:
    """Raise a ``ValueError`` naming the choices unless ``mode`` is one of them."""
    if mode not in COMPUTE_MODES:
        raise ValueError(f"unknown compute mode {mode!r}; expected one of {COMPUTE_MODES}")
