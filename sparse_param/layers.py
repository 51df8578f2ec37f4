"""Which layers are sparse: target discovery and the view of one sparse layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .mask import SparseMask

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SparseLayer:
    """One sparse weight of a model: the module, its name, and its masking state.

    ``weight`` is the stored parameter (what the optimizer updates); ``mask`` and
    ``ever_active`` are the bool buffers of its :class:`SparseMask`.
    """

    name: str
    module: nn.Module

    @property
    def parametrization(self) -> SparseMask:
        return self.module.parametrizations.weight[0]

    @property
    def weight(self) -> nn.Parameter:
        return self.module.parametrizations.weight.original

    @property
    def mask(self) -> Tensor:
        return self.parametrization.mask

    @property
    def ever_active(self) -> Tensor:
        return self.parametrization.ever_active

    @property
    def active(self) -> int:
        """Number of active weights."""
        return int(self.mask.count_nonzero())  # faster than sum() on bool

    @property
    def numel(self) -> int:
        return self.mask.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def sparse_layers(model: nn.Module) -> Iterator[SparseLayer]:
    """Yield every sparse layer of ``model`` in module order."""
    for name, module in unwrap(model).named_modules():
        if is_sparse(module):
            yield SparseLayer(name, module)


def is_sparse(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries a :class:`SparseMask` parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, SparseMask) for p in module.parametrizations.weight
    )


def find_targets(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, nn.Module]:
    """Name to module of every layer whose weight ``sparsify`` would mask, in model order.

    A target is an instance of one of ``layer_types`` (subclasses included) with a
    ``weight`` parameter of two or more dims, whose name matches a pattern of
    ``include`` (``fnmatch`` style; all names when None), and that is neither matched
    by a name pattern nor an instance of a type in ``exclude``. ``dense_first`` /
    ``dense_last`` then drop the first / last target in module order.
    """
    patterns = [e for e in exclude if isinstance(e, str)]
    types = tuple(e for e in exclude if isinstance(e, type))
    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, tuple(layer_types)) or isinstance(module, types):
            continue
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        targets[name] = module
    names = list(targets)
    for keep_dense, index in ((dense_first, 0), (dense_last, -1)):
        if keep_dense and names:
            targets.pop(names[index], None)
    return targets
