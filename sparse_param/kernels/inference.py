"""CSR inference on CPU: :class:`SparseLinear`, what ``to_sparse(format="csr")`` puts in
place of a sparse Linear layer.

Measured on CPU (``benchmarks/bench_to_sparse.py``, figures in ``benchmarks/README.md``):
for ``y = x W^T + b`` with a CSR weight the fastest contiguous form PyTorch offers is
``torch.addmm(b[:, None], W_csr, x.T).T`` (MKL sparse kernel, sparse matrix on the
left); ``F.linear(x, W_csr)`` is slower than dense below about 95% sparsity. On one
thread, feeding the tokens in blocks of 32 keeps the block of ``x.T`` in cache and
made the product 1.4-6x faster for many tokens or wide inputs; then a 3072x768 or
768x3072 weight at 90/95/98% sparsity ran about 1.4-1.8x / 2.3-3.2x / 4.4-5.2x faster
than dense for 197 to 1576 tokens, while at 85% it was about break-even. Hence
``to_sparse``'s default ``min_sparsity=0.9``. With several threads, one call over all
tokens was faster than blocks, and the gains were smaller and less steady.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .linear import computed_weight

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
        return cls(computed_weight(module), module.bias)

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
