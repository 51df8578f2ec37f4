"""Sparse kernels and formats: how a sparse Linear layer computes, in training and after.

* :mod:`~sparse_param.kernels.csr`: the CSR training path, chosen with
  ``sparsify(..., compute=...)`` or :func:`set_compute` (forward and both gradients from
  the active weights only).
* :mod:`~sparse_param.kernels.condensed`: constant fan-in layers held as a dense block
  of values and input indices (:class:`CondensedLinear`; trains too).
* :mod:`~sparse_param.kernels.inference`: CSR inference on CPU (:class:`SparseLinear`).
* :mod:`~sparse_param.kernels.semi_structured`: 2:4 semi-structured inference on CUDA.
* :mod:`~sparse_param.kernels.convert`: :func:`to_sparse`, the one conversion entry
  point, and :data:`FORMATS`, the mapping of format names to conversions.

"Structure" means the sparsity pattern only (:mod:`sparse_param.structure`: fan-in,
N:M); the CSR arrays of a mask are its index (:class:`CsrIndex`).
"""

from .condensed import CondensedLinear, condense, condensed_linear
from .convert import FORMATS, Format, to_sparse
from .csr import (
    AUTO_RULES,
    COMPUTE_MODES,
    CsrIndex,
    SparseCompute,
    auto_picks_sparse,
    check_compute_mode,
    compute_modes,
    remove_sparse_compute,
    set_compute,
    supports_compute_target,
    supports_sparse_compute,
)
from .inference import SparseLinear
from .semi_structured import semi_structured_linear

__all__ = [
    "AUTO_RULES",
    "COMPUTE_MODES",
    "FORMATS",
    "CondensedLinear",
    "CsrIndex",
    "Format",
    "SparseCompute",
    "SparseLinear",
    "auto_picks_sparse",
    "check_compute_mode",
    "compute_modes",
    "condense",
    "condensed_linear",
    "remove_sparse_compute",
    "semi_structured_linear",
    "set_compute",
    "supports_compute_target",
    "supports_sparse_compute",
    "to_sparse",
]
