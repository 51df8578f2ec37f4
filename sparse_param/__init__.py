"""sparse_param: sparse-from-scratch training for any PyTorch model."""

from . import kernels, models, plots  # models: registers the papers' architectures with timm
from .algorithms import ALGORITHMS, DSR, GMP, SET, SNFS, GraNet, RigL, SRigL, Static
from .allocation import allocate, apportion
from .capacity import SameCapacity, capacity, same_capacity_dense
from .checkpoint import (
    dense_state_dict,
    finalize,
    is_sparse_state_dict,
    load_state_dict,
    save_safetensors,
)
from .flops import dense_training_flops, training_flops, weight_uses
from .init import rescale_to_active_fan_in
from .kernels import SparseLinear, to_sparse
from .layers import SparseLayer, sparse_layers
from .mask import SparseMask
from .meta import materialize
from .metrics import (
    GradientFlow,
    density,
    effective_density,
    effective_gradient_flow,
    gradient_flow,
    itop_rate,
    layer_table,
    summary,
)
from .scheduler import SparseScheduler, attached_scheduler
from .sparsify import sparsify

__all__ = [
    "ALGORITHMS",
    "GradientFlow",
    "SameCapacity",
    "DSR",
    "GMP",
    "GraNet",
    "RigL",
    "SET",
    "SNFS",
    "SRigL",
    "SparseScheduler",
    "Static",
    "SparseLayer",
    "SparseLinear",
    "SparseMask",
    "allocate",
    "apportion",
    "attached_scheduler",
    "capacity",
    "dense_training_flops",
    "dense_state_dict",
    "density",
    "effective_density",
    "effective_gradient_flow",
    "finalize",
    "gradient_flow",
    "is_sparse_state_dict",
    "itop_rate",
    "kernels",
    "layer_table",
    "materialize",
    "models",
    "plots",
    "load_state_dict",
    "rescale_to_active_fan_in",
    "same_capacity_dense",
    "save_safetensors",
    "sparse_layers",
    "sparsify",
    "summary",
    "to_sparse",
    "training_flops",
    "weight_uses",
]
