"""Dynamic sparse training algorithms: criteria on the engine of ``scheduler.py``."""

from .dsr import DSR
from .gmp import GMP, GraNet
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .srigl import SRigL
from .static import Static

ALGORITHMS = {
    cls.__name__.lower(): cls for cls in (Static, SET, RigL, SRigL, SNFS, DSR, GMP, GraNet)
}

__all__ = ["ALGORITHMS", "DSR", "GMP", "GraNet", "RigL", "SET", "SNFS", "SRigL", "Static"]
