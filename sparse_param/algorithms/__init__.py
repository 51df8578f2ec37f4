"""Dynamic sparse training algorithms: criteria on the engine of :mod:`sparse_param.scheduler`."""

from .dsr import DSR
from .gmp import GMP, GraNet
from .registry import ALGORITHMS, PRUNING_METHODS, create_scheduler
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .srigl import SRigL
from .static import Static

__all__ = [
    "ALGORITHMS",
    "DSR",
    "GMP",
    "GraNet",
    "PRUNING_METHODS",
    "RigL",
    "SET",
    "SNFS",
    "SRigL",
    "Static",
    "create_scheduler",
]
