"""Which layers are sparse: target discovery and the view of one sparse layer."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .arguments import check_model
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
    # Looked up once: nn.Module attribute lookups cost microseconds, and the hooks of
    # every step read these for every layer.
    _parametrizations: nn.Module = field(init=False, repr=False, compare=False)
    parametrization: SparseMask = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parametrizations = self.module.parametrizations.weight
        object.__setattr__(self, "_parametrizations", parametrizations)
        object.__setattr__(self, "parametrization", parametrizations[0])

    @property
    def weight(self) -> nn.Parameter:
        # Read each time: FSDP2 and load_state_dict(assign=True) replace the Parameter.
        return self._parametrizations.original

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
    check_model("sparse_layers", model)  # raised at the first next(): callers list() at once
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
    layer_types: type[nn.Module] | Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: str | Sequence[str] | None = None,
    exclude: str | type[nn.Module] | Sequence[str | type[nn.Module]] = (),
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, nn.Module]:
    """Name to module of every layer whose weight ``sparsify`` would mask, in model order.

    A target is an instance of one of ``layer_types`` (subclasses included) with a
    ``weight`` parameter of two or more dims, that a pattern of ``include`` selects
    (all layers when None), and that neither a pattern nor a type of ``exclude``
    selects. ``dense_first`` / ``dense_last`` then drop the first / last target in
    module order.

    A name pattern (``fnmatch`` style, e.g. ``"head"``, ``"blocks.*.mlp.fc?"``) selects
    the modules whose name it matches and every layer inside them, so ``"head"`` covers
    ``"head.fc"``. A single pattern or type may be given as it is, without a list.

    Raises:
        TypeError: an argument of the wrong type (``include=[1]``, ``layer_types="Linear"``).
        ValueError: a name pattern that matches no module of ``model`` (a typo would
            otherwise silently select nothing); a target whose ``weight`` is computed from other
            tensors (``weight_norm``, ``spectral_norm``, any parametrization), or is
            uninitialized (lazy modules). Each message names the layer and the
            ``exclude=`` fix.
    """
    layer_types = _as_tuple("layer_types", layer_types, (type,))
    if not all(issubclass(t, nn.Module) for t in layer_types):
        raise TypeError(f"layer_types must be nn.Module subclasses, got {list(layer_types)}")
    includes = None if include is None else _as_tuple("include", include, (str,))
    excludes = _as_tuple("exclude", exclude, (str, type))
    patterns = [e for e in excludes if isinstance(e, str)]
    types = tuple(e for e in excludes if isinstance(e, type))
    names = [name for name, _ in model.named_modules()]
    given = [("include", p) for p in includes or ()] + [("exclude", p) for p in patterns]
    for argument, pattern in given:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"{argument} pattern {pattern!r} matches no module of the model{hint}")

    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or isinstance(module, types):
            continue
        if includes is not None and not _selects(includes, name):
            continue
        if _selects(patterns, name):
            continue
        # Never read a parametrized weight here: reading it runs the parametrization
        # (spectral_norm's power iteration updates its buffers in train mode).
        if not parametrize.is_parametrized(module, "weight"):
            weight = getattr(module, "weight", None)
            if weight is None:
                continue
            if isinstance(weight, nn.Parameter) and not nn.parameter.is_lazy(weight):
                if weight.dim() < 2:
                    continue  # no weight matrix (a custom layer's per-channel scale, say)
        targets[name] = module
    order = list(targets)
    for keep_dense, index in ((dense_first, 0), (dense_last, -1)):
        if keep_dense and order:
            targets.pop(order[index], None)
    for name, module in targets.items():
        _check_plain_weight(name, module)
    return targets


def _as_tuple(argument: str, value: object, kinds: tuple[type, ...]) -> tuple:
    """``value`` as a tuple of items of ``kinds``; a single item is a tuple of one.

    A string is one pattern, never iterated character by character.
    """
    if isinstance(value, kinds):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{argument} must be {_kinds(kinds)} or a list of them, got {value!r}")
    items = tuple(value)
    wrong = [item for item in items if not isinstance(item, kinds)]
    if wrong:
        raise TypeError(f"{argument} must hold only {_kinds(kinds)}, got {wrong!r}")
    return items


def _kinds(kinds: tuple[type, ...]) -> str:
    words = {str: "name patterns (str)", type: "module types"}
    return " or ".join(words[kind] for kind in kinds)


def _selects(patterns: Sequence[str], name: str) -> bool:
    """Whether a pattern matches ``name`` or the name of a module containing it."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return any(fnmatch.fnmatchcase(scope, p) for p in patterns for scope in scopes)


def _check_plain_weight(name: str, module: nn.Module) -> None:
    """Refuse a target whose ``weight`` is not a plain stored parameter.

    The mask lives on the stored parameter: the optimizer, the scheduler's prune and
    grow, and the zeroing of optimizer state all act on it. A weight computed from other
    tensors (weight_norm's g and v, spectral_norm's normalized copy) has no single
    stored tensor to keep zero off the mask, so it is refused rather than left dense.
    """
    if parametrize.is_parametrized(module, "weight"):
        kind = type(module).__mro__[1].__name__  # the class parametrize derived from
        how = [type(p).__name__ for p in module.parametrizations.weight]
        fix = "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
    else:
        weight, kind = module.weight, type(module).__name__
        if nn.parameter.is_lazy(weight):
            raise ValueError(
                f"sparsify: layer {name!r} ({kind}) has an uninitialized (lazy) weight: run "
                f"one forward pass to initialize it before sparsify"
            )
        if isinstance(weight, nn.Parameter):
            return
        # Old-style weight_norm / spectral_norm: a forward pre-hook recomputes the
        # ``weight`` attribute from weight_g and weight_v (weight_orig) every call.
        how = [type(h).__name__ for h in module._forward_pre_hooks.values()] or [
            "something other than a parameter (a buffer or plain attribute)"
        ]
        fix = "torch.nn.utils.remove_weight_norm / remove_spectral_norm"
    raise ValueError(
        f"sparsify: layer {name!r} ({kind}) computes its weight with {how}, so a mask on "
        f"a stored weight cannot keep what it computes with sparse; leave it dense with "
        f"exclude=[{name!r}], or remove that first ({fix})"
    )


def tied_weights(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, str]:
    """The targets whose weight is also a parameter of another module (tied weights: an
    LM head sharing the token embedding) or of its own module under another name, each
    with what it is tied to. Masking such a weight would zero weights the other module
    computes with, so ``sparsify`` leaves them dense."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module_name, module, param_name))
    tied = {}
    for name, module in targets.items():
        others = [
            f"{other_name or '(the model)'}.{param_name} ({type(other).__name__})"
            for other_name, other, param_name in owners[id(module.weight)]
            if not (other is module and param_name == "weight")  # itself, under two names
        ]
        if others:
            tied[name] = others[0]
    return tied


# Weight matrices of module kinds sparsify does not mask: (kind, parameter names).
_UNSUPPORTED = (
    (nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
    (nn.RNNBase, None),  # every weight_ih_l* / weight_hh_l* (per layer and direction)
)


def unsupported_matrices(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the weight matrices of ``model`` that belong to a kind of module
    ``sparsify`` cannot mask (``nn.MultiheadAttention``'s input projections, the weights
    of ``nn.LSTM``/``nn.GRU``/``nn.RNN``, Hugging Face's ``Conv1D``), outside modules
    that the name patterns ``exclude`` select."""
    found = []
    for name, module in model.named_modules():
        if _selects(exclude, name):
            continue
        for kind, names in _UNSUPPORTED:
            if isinstance(module, kind):
                found += [
                    f"{name}.{param_name}" if name else param_name
                    for param_name, param in module.named_parameters(recurse=False)
                    if param.dim() >= 2 and (names is None or param_name in names)
                ]
        if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
            found.append(f"{name}.weight")
    return found
