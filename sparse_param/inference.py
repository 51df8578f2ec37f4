"""Real sparse inference on CPU: ``to_sparse`` swaps sparse Linear layers for CSR ones.

Measured on CPU (``benchmarks/bench_to_sparse.py``, figures in ``benchmarks/README.md``):
for ``y = x W^T + b`` with a CSR weight the fastest contiguous form PyTorch offers is
``torch.addmm(b[:, None], W_csr, x.T).T`` (MKL sparse kernel, sparse matrix on the
left); ``F.linear(x, W_csr)`` is slower than dense below about 95% sparsity. On one
thread, feeding the tokens in blocks of 32 keeps the block of ``x.T`` in cache and
made the product 1.4-6x faster for many tokens or wide inputs; then a 3072x768 or
768x3072 weight at 90/95/98% sparsity ran about 1.4-1.8x / 2.3-3.2x / 4.4-5.2x faster
than dense for 197 to 1576 tokens, while at 85% it was about break-even. Hence the
default ``min_sparsity=0.9``. With several threads, one call over all tokens was
faster than blocks, and the gains were smaller and less steady.

PyTorch has no sparse convolution on CPU, so convolutions stay as they are: a sparse
conv keeps computing densely with its masked weight.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .condensed import CondensedLinear
from .layers import is_sparse, unwrap

try:  # timm's Linear only adds a torchscript cast to nn.Linear's forward
    from timm.layers import Linear as _TimmLinear

    _LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _TimmLinear)
except ImportError:  # timm is optional for the core
    _LINEAR_TYPES = (nn.Linear,)

_MKL_DTYPES = (torch.float32, torch.float64)  # dtypes the CPU sparse kernels support


class SparseLinear(nn.Module):
    """An inference-only Linear layer whose weight is held in CSR form.

    Computes ``y = x W^T + b`` as ``addmm(b, W_csr, x^T)^T`` for inputs of shape
    ``(*, in_features)`` (in blocks of ``block_tokens`` tokens), returning a contiguous
    ``(*, out_features)`` tensor in the input's dtype. Only the non-zero weights are
    stored: values in the weight's dtype plus int32 column indices and row pointers
    (about 8 bytes per non-zero for float32).

    Inference only: the product runs under ``no_grad`` and an input that requires
    gradient raises ``RuntimeError`` (call the model under ``torch.no_grad()`` or
    ``torch.inference_mode()``). To train again, load its ``state_dict`` into a plain
    model.

    ``state_dict`` holds ``weight`` (dense, zeros included) and ``bias`` exactly as an
    ``nn.Linear`` of the same shape would, so a ``to_sparse`` model's checkpoint loads
    into a plain model, and ``load_state_dict`` of such a checkpoint into this layer
    rebuilds the CSR weight from the given one. Reading ``.weight`` materializes the
    dense weight (for code that passes ``module.weight`` to ``F.linear`` itself); the
    layer's own forward never does.

    float16 / bfloat16 weights or inputs are computed in float32 (the CPU sparse kernels
    support float32 and float64 only) and cast back to the input's dtype.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    # Tokens per sparse product (see forward); None: 32 on one thread, all tokens at once
    # on several (short multi-threaded calls lost to their fork/join cost in our runs).
    block_tokens: int | None = None

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(
                    f"SparseLinear: bias shape {tuple(bias.shape)} does not match "
                    f"out_features={self.out_features}"
                )
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, module: nn.Module) -> SparseLinear:
        """Build from an ``nn.Linear``, sparse (masked) or plain; the module is unchanged."""
        with torch.no_grad():
            weight = module.weight
            if is_sparse(module):
                weight = weight * module.parametrizations.weight[0].mask
            return cls(weight.detach(), module.bias)

    @torch.no_grad()
    def _set_weight(self, weight: Tensor) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.detach().to_sparse_csr()
        index_dtype = torch.int32 if csr.values().numel() < 2**31 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(index_dtype), persistent=False)
        self.register_buffer("col_indices", csr.col_indices().to(index_dtype), persistent=False)
        self.register_buffer("values", csr.values().clone(), persistent=False)

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return self.values.numel()

    def weight_csr(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor (shares this layer's storage)."""
        values = self.values if dtype is None else self.values.to(dtype)
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    @property
    def weight(self) -> Tensor:
        """The dense weight (zeros included), materialized on every read."""
        return self.weight_csr().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "SparseLinear is inference-only and passes no gradient: run the model under "
                "torch.no_grad() or torch.inference_mode()"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseLinear: input has {x.shape[-1]} features in its last dim, "
                f"expected {self.in_features}"
            )
        dtype = self.values.dtype if self.values.dtype in _MKL_DTYPES else torch.float32
        with torch.no_grad():
            x2 = x.reshape(-1, self.in_features).to(dtype)
            weight = self.weight_csr(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)[:, None]
            out = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x.device)
            # Tokens in blocks: W_csr @ x_block.T reads a row of x_block.T per non-zero, so
            # on one thread the block should stay in cache (measured: blocks of 32 tokens
            # of 3072 features ran 1.5-6x faster than one call over 788 tokens).
            step = self.block_tokens or (32 if torch.get_num_threads() == 1 else x2.shape[0])
            for start in range(0, x2.shape[0], max(step, 1)):
                block = x2[start : start + step].T
                if bias is None:
                    part = torch.sparse.mm(weight, block)
                else:
                    part = torch.addmm(bias, weight, block)
                out[start : start + step] = part.T
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight  # first, as in nn.Linear
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        shape = (self.out_features, self.in_features)
        if tuple(weight.shape) != shape:
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)} "
                f"from checkpoint, the shape in current model is {shape}."
            )
            return
        device = self.values.device
        self._set_weight(weight.to(device=device, dtype=self.values.dtype))

    def extra_repr(self) -> str:
        numel = self.out_features * self.in_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.nnz / numel:.4f}"
        )


def _linear_type(module: nn.Module) -> type[nn.Module]:
    """The module's class, seen through the class ``parametrize`` generates."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _zeros(module: nn.Module) -> tuple[int, int]:
    """(zero count, numel) of the weight the layer computes with."""
    with torch.no_grad():
        weight = module.weight
        if is_sparse(module):
            weight = weight * module.parametrizations.weight[0].mask
        return weight.numel() - int(torch.count_nonzero(weight)), weight.numel()


FORMATS = ("csr", "condensed", "semi_structured")


def to_sparse(
    model: nn.Module, *, min_sparsity: float = 0.9, plain: bool = True, format: str = "csr"
) -> nn.Module:
    """Replace the sparse ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    ``format`` picks the replacement: ``"csr"`` (default, :class:`SparseLinear`, CPU),
    ``"condensed"`` (:class:`~sparse_param.condensed.CondensedLinear`, for constant
    fan-in masks: ``sparsify(..., structure="fan_in")``) or ``"semi_structured"`` (a plain
    ``nn.Linear`` whose weight is ``torch.sparse.to_sparse_semi_structured`` of the 2:4
    weight, run by the sparse tensor cores of NVIDIA GPUs from Ampere on; CUDA only,
    float16 / bfloat16 weights, shapes as that function requires). For ``"condensed"``
    and ``"semi_structured"`` every layer chosen must have the structure; otherwise the
    call raises before changing anything. ``min_sparsity`` still chooses the layers (pass
    ``min_sparsity=0.5`` for 2:4).

    For inference only (CPU): the converted layers compute with a CSR weight and pass no
    gradient; do not keep training a ``to_sparse`` model (train the sparse model, then
    convert a copy, or load its ``state_dict`` into a plain model).

    Converted: every layer whose class is ``nn.Linear`` (or timm's ``Linear``) and
        - carries a :class:`~sparse_param.SparseMask` (from ``sparsify``), or
        - with ``plain=True``, is a plain Linear, as after ``finalize`` or after loading
          a ``dense_state_dict`` / ``save_safetensors`` checkpoint into a fresh model,
    provided the share of exact zeros in the weight it computes with is at least
    ``min_sparsity`` (give or take one weight, for integer rounding). Sparse compute is
    slower than dense for denser weights, so the others stay as they are. Subclasses of
    ``nn.Linear`` with their own forward (e.g. the ``out_proj`` of
    ``nn.MultiheadAttention``, whose weight is read directly) are left alone, and so are
    convolutions: PyTorch has no sparse convolution, so sparse convs keep computing
    densely with their masked weight.

    Forward hooks registered on a converted module are not carried over. The converted
    model's ``state_dict`` stores each converted layer as an ``nn.Linear`` would
    (``weight`` dense with zeros, ``bias``); unconverted sparse layers keep their
    masking parametrization keys, which :func:`~sparse_param.dense_state_dict` and
    :func:`~sparse_param.save_safetensors` turn into plain ones.

    Args:
        model: a model (DDP / DataParallel / ``torch.compile`` wrappers are looked through).
        min_sparsity: convert only Linear layers with at least this share of zero weights,
            in [0, 1]. The default 0.9 is where the CSR product is clearly faster than
            dense on CPU (see the module docstring).
        plain: also convert plain Linear layers that are at least ``min_sparsity`` zeros.

    Returns:
        ``model``, with its layers replaced.

    Raises:
        ValueError: ``min_sparsity`` outside [0, 1], an unknown ``format``, no layer to
            convert (no sparse or plain Linear at least ``min_sparsity`` zeros), or a
            chosen layer without the format's structure; the model is left unchanged.
        RuntimeError: ``format="semi_structured"`` with a layer that is not on CUDA.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"to_sparse: min_sparsity must be in [0, 1], got {min_sparsity}")
    if format not in FORMATS:
        raise ValueError(f"to_sparse: unknown format {format!r}; expected one of {FORMATS}")
    root = unwrap(model)
    chosen: list[tuple[nn.Module, str, nn.Module]] = []
    below: list[tuple[float, str]] = []
    sparse_other: list[str] = []
    for parent_name, parent in root.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _linear_type(child) not in _LINEAR_TYPES:
                if is_sparse(child):
                    sparse_other.append(name)
                continue
            sparse = is_sparse(child)
            if not sparse and (not plain or parametrize.is_parametrized(child)):
                continue
            zeros, numel = _zeros(child)
            # one weight of slack: density 0.1 rounds to 10.00001% active on many shapes
            if zeros + 1 >= min_sparsity * numel:
                chosen.append((parent, child_name, child))
            elif sparse or zeros > numel / 2:
                below.append((zeros / numel, name))
    if not chosen:
        raise ValueError(_nothing_to_convert(root, min_sparsity, plain, below, sparse_other))
    build = {"csr": SparseLinear.from_linear, "condensed": CondensedLinear.from_linear}.get(
        format, _semi_structured
    )
    if format != "csr":
        _check_format(root, [child for _, _, child in chosen], format)
    converted: dict[int, nn.Module] = {}  # a module shared by two parents converts once
    for parent, child_name, child in chosen:
        if id(child) not in converted:
            converted[id(child)] = build(child)
        setattr(parent, child_name, converted[id(child)])
    return model


def _computed_pattern(module: nn.Module) -> Tensor:
    """Bool pattern of the weight a Linear computes with: its mask, or its non-zeros."""
    with torch.no_grad():
        if is_sparse(module):
            return module.parametrizations.weight[0].mask
        return module.weight != 0


def _check_format(root: nn.Module, modules: list[nn.Module], format: str) -> None:
    """Raise before any change if a chosen layer cannot take ``format``."""
    names = {id(m): name for name, m in root.named_modules()}
    for module in modules:
        pattern = _computed_pattern(module)
        if format == "condensed":
            fan_ins = pattern.sum(1)
            if fan_ins[fan_ins > 0].unique().numel() > 1:
                raise ValueError(
                    f"to_sparse(format='condensed'): layer {names[id(module)]!r} is not "
                    f"constant fan-in; sparsify with structure='fan_in', or use format='csr'"
                )
            continue
        # 2:4 hardware takes at most 2 non-zeros in every 4 consecutive inputs.
        why = (
            f"in_features {pattern.shape[1]} is not a multiple of 4"
            if pattern.shape[1] % 4
            else None
        )
        over = 0 if why else int((pattern.reshape(-1, 4).sum(1) > 2).sum())
        if over:
            why = f"{over} of {pattern.numel() // 4} groups of 4 inputs have more than 2 active"
        if why is not None:
            raise ValueError(
                f"to_sparse(format='semi_structured'): layer {names[id(module)]!r} is not 2:4 "
                f"({why}); sparsify with structure='2:4' (or prune to it with GMP)"
            )
        if module.weight.device.type != "cuda":
            raise RuntimeError(
                f"to_sparse(format='semi_structured'): layer {names[id(module)]!r} is on "
                f"{module.weight.device}; 2:4 semi-structured sparse kernels run on CUDA only "
                f"(NVIDIA Ampere or newer): move the model with model.cuda().half() first, "
                f"or use format='csr' / 'condensed' on CPU"
            )


def _semi_structured(module: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` computing with the 2:4 weight in semi-structured form."""
    with torch.no_grad():
        weight = module.weight.detach() * _computed_pattern(module)
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight = nn.Parameter(
        torch.sparse.to_sparse_semi_structured(weight), requires_grad=False
    )
    return linear


def _nothing_to_convert(
    model: nn.Module,
    min_sparsity: float,
    plain: bool,
    below: list[tuple[float, str]],
    sparse_other: list[str],
) -> str:
    kinds = "sparse nn.Linear (sparse_param.sparsify)"
    if plain:
        kinds += " or plain nn.Linear"
    msg = (
        f"to_sparse: no layer of {type(model).__name__} to convert: no {kinds} layer has "
        f"at least {min_sparsity:.0%} zero weights."
    )
    if below:
        sparsity, name = max(below)
        msg += (
            f" The sparsest candidate, {name!r}, is {sparsity:.2%} zeros; pass a lower "
            f"min_sparsity to convert it (below about 85% sparsity the CSR product is "
            f"slower than dense on CPU)."
        )
    if sparse_other:
        msg += (
            f" The model's other sparse layers ({len(sparse_other)}, e.g. {sparse_other[0]!r})"
            f" are convolutions or other non-Linear modules, which stay masked dense:"
            f" PyTorch has no sparse convolution."
        )
    return msg
