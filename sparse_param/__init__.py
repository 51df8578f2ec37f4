"""sparse_param: sparse-from-scratch training for any PyTorch model.

The names below are the library's public API. Advanced pieces live in their submodules
and are imported from there: ``sparse_param.kernels`` (sparse kernels and formats),
``sparse_param.checkpoint`` (keys, checks, loading, DCP state), ``sparse_param.models``
(the papers' architectures, registered with timm when that module is imported),
``sparse_param.plots``. Importing ``sparse_param`` imports neither timm, torchvision nor
matplotlib.
"""

from .algorithms import (
    ALGORITHMS,
    DSR,
    GMP,
    SET,
    SNFS,
    GraNet,
    RigL,
    SRigL,
    Static,
    create_scheduler,
)
from .allocation import allocate
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
    # make a model sparse
    "sparsify",
    "materialize",
    "rescale_to_active_fan_in",
    "allocate",
    # train it: the algorithms, by class or by name
    "SparseScheduler",
    "Static",
    "SET",
    "RigL",
    "SRigL",
    "SNFS",
    "DSR",
    "GMP",
    "GraNet",
    "ALGORITHMS",
    "create_scheduler",
    "attached_scheduler",
    # read it
    "density",
    "itop_rate",
    "layer_table",
    "summary",
    "gradient_flow",
    "effective_gradient_flow",
    "effective_density",
    "GradientFlow",
    "training_flops",
    "dense_training_flops",
    "weight_uses",
    "capacity",
    "same_capacity_dense",
    "SameCapacity",
    # finish and export it
    "finalize",
    "dense_state_dict",
    "load_state_dict",
    "is_sparse_state_dict",
    "save_safetensors",
    "to_sparse",
    "SparseLinear",
    # its sparse layers
    "sparse_layers",
    "SparseLayer",
    "SparseMask",
]
