"""``sparsify``: turn a dense model into a sparse one, in place."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .allocation import allocate
from .arguments import check_model, listed
from .checkpoint.checks import install
from .distributed import is_sharded
from .given import given_masks
from .init import draw_mask, rescale_to_active_fan_in
from .kernels.csr import check_compute_mode, set_compute, supports_compute_target
from .layers import (
    DEFAULT_LAYER_TYPES,
    find_targets,
    sparse_layers,
    tied_weights,
    unsupported_matrices,
)
from .mask import SparseMask, zero_inactive_after_load, zero_inactive_before_save
from .meta import MaskPlan
from .standardized import install_sparse_forward, is_standardized
from .structure import Structure, parse_structure, record
from .warn import warn

FROZEN, TIED, KIND = "frozen (requires_grad=False)", "tied", "of a kind sparsify cannot mask"
_FIXES = {
    FROZEN: "A frozen layer becomes sparse if requires_grad=True before sparsify.",
    TIED: "Masking a tied weight would zero what the other module computes with.",
    KIND: "See the guide's 'Supported layers'.",
}


def sparsify(
    model: nn.Module,
    density: float | None = None,
    *,
    distribution: str | Mapping[str, float] = "erk",
    layer_types: type[nn.Module] | Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: str | Sequence[str] | None = None,
    exclude: str | type[nn.Module] | Sequence[str | type[nn.Module]] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    seed: int | torch.Generator = 0,
    sparse_init: bool | None = None,
    compute: str = "dense",
    structure: str | None = None,
    masks: str | Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Make the weights of ``model``'s Linear and Conv layers sparse, in place.

    Each target weight gets a :class:`~sparse_param.SparseMask` parametrization whose
    random mask has exactly the active count the allocation gives it; the stored
    weight is zeroed where the mask is off and ``ever_active`` starts equal to the mask.
    Biases, norms, embeddings and tokens are never touched.

    Args:
        model: any ``nn.Module``; call before building the optimizer and EMA.
        density: share of active weights over all target layers, in (0, 1]; 0.02
            when not given (and not given with ``masks``).
        distribution: ``"erk"`` (Erdős–Rényi-Kernel), ``"er"``, ``"uniform"``, or a
            mapping of layer name to density (other layers get ``density``).
        layer_types: module types whose ``weight`` is a target (subclasses included).
        include: ``fnmatch`` pattern(s) of module names to target (default: all); a
            pattern selects the modules it matches and every layer inside them.
        exclude: name pattern(s) or module type(s) to leave dense. A single string is
            one pattern. See :func:`~sparse_param.layers.find_targets`.
        dense_first, dense_last: leave the first / last target layer dense.
        seed: an int or a ``torch.Generator`` (CPU) for the masks; the same seed gives
            the same masks on every run, platform and DDP rank.
        sparse_init: rescale each output unit's weights by
            ``sqrt(fan_in / active_fan_in)`` so its init variance matches a dense layer's
            (Evci et al., gradient flow in sparse networks). On by default for drawn
            masks: at density 0.02 the unscaled init leaves small CNNs stuck at chance.
            ``False`` keeps the active weights exactly as the model initialized them;
            given ``masks`` always keep them (it cannot be set with ``masks``).
        compute: how the sparse Linear layers compute (see
            :func:`sparse_param.kernels.set_compute`): ``"dense"`` (masked dense kernels),
            ``"sparse"`` (CSR kernels over the active weights only) or ``"auto"``
            (sparse where the calibration says it is faster). Convolutions compute
            dense in every mode.
        structure: None (unstructured), ``"fan_in"`` (every output unit of a layer keeps
            the same number of active inputs; the distribution decides each layer's
            fan-in, rounded to whole units) or ``"N:M"`` such as ``"2:4"`` (N active in
            every M consecutive inputs, groups along the flattened input dimension;
            ``density`` must equal N/M, and a fan-in M does not divide is refused). The
            structure is recorded in each mask (buffer ``structure``, in the state dict),
            kept by the schedulers and checked when a checkpoint is loaded.
        masks: masks the model already has, instead of drawn ones (fine-tuning a pruned
            model): ``"nonzero"`` (each target's non-zero weights are its active ones)
            or a mapping of every target layer's name to a bool tensor shaped like its
            weight. ``density``, ``distribution``, ``structure`` and ``sparse_init``
            cannot be given with it. ``sp.summary(model)`` then shows each layer's
            density. ``Static`` keeps these masks; any other method moves them.

    Loading a state dict into ``model`` (or any copy of it) is then checked before
    anything is copied: see :mod:`sparse_param.checkpoint.checks`.

    Returns:
        ``model``, with the density of the weights its layers compute with equal to the
        allocation (``round(density * total)`` active weights for named distributions).

    Raises:
        ValueError / TypeError: bad arguments, a model that is already sparse or has no
            target layers, a pattern that matches no module, a target whose weight is
            computed by a parametrization (``weight_norm``, ``spectral_norm``); the model
            is left exactly as it was.

    Warns:
        UserWarning: once, naming the weight matrices left dense without being excluded:
            frozen targets (``requires_grad=False``), targets whose weight is tied to
            another module's (an LM head tied to its embedding), and matrices of kinds
            it cannot mask (``nn.MultiheadAttention``'s input projections, RNN weights,
            Hugging Face's ``Conv1D``); and once naming layers allocated a single
            active weight.
    """
    check_model("sparsify", model)
    if next(sparse_layers(model), None) is not None:
        raise ValueError(
            "sparsify: the model is already sparse; build a fresh model to sparsify it "
            "again, or call sparse_param.finalize(model) first to make it dense"
        )
    check_compute_mode(compute)
    targets = find_targets(model, layer_types, include, exclude, dense_first, dense_last)
    dense = _left_dense(model, targets, exclude)
    frozen = list(dense[FROZEN])
    left = frozen + list(dense[TIED])
    targets = {name: m for name, m in targets.items() if name not in left}
    if not targets:
        reason = (
            f"every candidate weight is frozen or tied to another module: {listed(left)}"
            if left
            else f"no module of types {_type_names(layer_types)} with a weight matched "
            f"include={include!r} and exclude={exclude!r}"
        )
        raise ValueError(f"sparsify: no target layers in {type(model).__name__}: {reason}")
    if compute != "dense" and not any(map(supports_compute_target, targets.values())):
        raise ValueError(
            f"sparsify: compute={compute!r} needs an nn.Linear target and there is none "
            f"(convolutions always compute dense); use compute='dense'"
        )
    _refuse_sharded(targets)
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    if masks is None:
        density = 0.02 if density is None else density
        sparse_init = True if sparse_init is None else sparse_init
        drawn, counts, plan = _drawn(
            targets, shapes, density, distribution, structure, seed, sparse_init, compute
        )
    else:
        _check_given(density, distribution, structure, sparse_init)
        drawn, plan, sparse_init = given_masks(targets, masks, frozen), None, False
        counts = {name: int(mask.count_nonzero()) for name, mask in drawn.items()}
    _register(targets, drawn, counts, plan, parse_structure(structure))
    install(model)
    if sparse_init and plan is None:
        rescale_to_active_fan_in(model)
    set_compute(model, compute)
    _report(dense, counts, shapes)
    return model


def _drawn(
    targets: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
    density: float,
    distribution: str | Mapping[str, float],
    structure: str | None,
    seed: int | torch.Generator,
    sparse_init: bool,
    compute: str,
) -> tuple[dict[str, torch.Tensor], dict[str, int], MaskPlan | None]:
    """The allocation's masks (placeholders on the meta device, with the plan that
    ``materialize`` draws them from), their active counts and that plan."""
    parsed = parse_structure(structure)
    if isinstance(distribution, Mapping):
        _check_mapping_counts(distribution, shapes)
    counts = allocate(shapes, density, distribution, parsed)
    generator = _generator(seed)
    plan = _meta_plan(targets, counts, parsed, generator, sparse_init)
    if plan is not None and compute != "dense":
        raise ValueError(
            f"sparsify: compute={compute!r} needs the masks, and a meta-device model gets "
            f"them at sp.materialize(model): sparsify with compute='dense', then call "
            f"sparse_param.kernels.set_compute(model, {compute!r}) after materialize"
        )
    if plan is None:
        masks = {name: draw_mask(shapes[name], counts[name], parsed, generator) for name in targets}
    else:  # drawn by materialize(model), once the model has storage
        masks = {
            name: torch.zeros(shapes[name], dtype=torch.bool, device="meta") for name in targets
        }
    return masks, counts, plan


def _check_given(
    density: float | None,
    distribution: str | Mapping[str, float],
    structure: str | None,
    sparse_init: bool | None,
) -> None:
    """Refuse the arguments that given masks make meaningless, rather than ignore them."""
    given = {
        "density": density is not None,
        "distribution": not (isinstance(distribution, str) and distribution == "erk"),
        "structure": structure is not None,
        "sparse_init": bool(sparse_init),
    }
    clashing = [name for name, set_ in given.items() if set_]
    if clashing:
        raise ValueError(
            f"sparsify: masks= fixes every layer's active weights, so {clashing} would do "
            f"nothing; drop them (the given weights are kept as they are, zeroed where "
            f"their mask is off)"
        )


def _register(
    targets: Mapping[str, nn.Module],
    masks: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    plan: MaskPlan | None,
    structure: Structure | None,
) -> None:
    """Register a :class:`SparseMask` on every target; all of them, or none on failure."""
    done: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for name, module in targets.items():
            mask = masks[name].to(module.weight.device)
            # Registering stores the weight masked, in new storage; keep the old storage
            # (no copy) until every layer is done, so a failure can give it back.
            dense = module.weight.detach()
            parametrization = SparseMask(mask)
            parametrization.allocated, parametrization.plan = counts[name], plan
            with torch.no_grad():  # its trial forward hands nothing to a backward pass
                parametrize.register_parametrization(module, "weight", parametrization)
            done.append((module, dense))
            module.parametrizations.weight.register_load_state_dict_post_hook(
                zero_inactive_after_load
            )
            if structure is not None:
                record(module.parametrizations.weight[0], structure)
            module.parametrizations.weight.register_state_dict_pre_hook(zero_inactive_before_save)
            stored = module.parametrizations.weight.original
            module.parametrizations.weight[0].catch.hook(stored)
            module.parametrizations.weight[0].gradient.hook(stored)
            if is_standardized(module):
                install_sparse_forward(module)
    except BaseException:
        for module, dense in done:
            module.__dict__.pop("forward", None)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.set_(dense)
        raise


def _left_dense(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    exclude: str | type[nn.Module] | Sequence[str | type[nn.Module]],
) -> dict[str, dict[str, str]]:
    """The weight matrices ``sparsify`` leaves dense without being told to, by reason,
    each with a note: frozen targets, tied targets (noting what they are tied to) and
    the matrices of kinds it cannot mask."""
    frozen = [name for name, module in targets.items() if not module.weight.requires_grad]
    tied = tied_weights(model, {n: m for n, m in targets.items() if n not in frozen})
    given = exclude if isinstance(exclude, (list, tuple)) else [exclude]
    patterns = [e for e in given if isinstance(e, str)]
    return {
        FROZEN: dict.fromkeys(frozen, ""),
        TIED: {name: f"to {other}" for name, other in tied.items()},
        KIND: dict.fromkeys(unsupported_matrices(model, patterns), ""),
    }


def _report(
    dense: Mapping[str, Mapping[str, str]],
    counts: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
) -> None:
    """Say once what a user would not see: weight matrices left dense without being
    excluded, layers that get a single active weight (all but cut out of the network)."""
    reasons = {
        why: [f"{name} ({note})" if note else name for name, note in notes.items()]
        for why, notes in dense.items()
        if notes
    }
    if reasons:
        named = "; ".join(f"{why}: {listed(names)}" for why, names in reasons.items())
        fixes = " ".join(_FIXES[why] for why in reasons)
        warn(
            f"sparsify: left {sum(map(len, reasons.values()))} weight matrices dense. "
            f"{named}. {fixes} To keep a matrix dense without this notice, exclude it"
        )
    single = [name for name, count in counts.items() if count == 1 < math.prod(shapes[name])]
    if single:
        warn(
            f"sparsify: layers {listed(single)} get a single active weight each, which all "
            f"but cuts them out of the network; raise the density, give them their own "
            f"(distribution={{name: d}}) or exclude them"
        )


def _meta_plan(
    targets: Mapping[str, nn.Module],
    counts: Mapping[str, int],
    structure: Structure | None,
    generator: torch.Generator,
    sparse_init: bool,
) -> MaskPlan | None:
    """The masks to draw at ``materialize`` if the targets are on the meta device, else
    None. A Generator seed is not advanced (nothing is drawn yet)."""
    on_meta = [module.weight.is_meta for module in targets.values()]
    if not any(on_meta):
        return None
    if not all(on_meta):
        meta = [name for name, m in zip(targets, on_meta) if m][:3]
        raise ValueError(
            f"sparsify: target layers {meta} are on the meta device and others are not; "
            f"build the whole model on one device (or materialize it first)"
        )
    return MaskPlan(
        generator.get_state(), tuple(counts[name] for name in targets), structure, sparse_init
    )


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("sparsify: seed must be an int or a CPU torch.Generator")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"sparsify: seed must be an int or a torch.Generator, got {seed!r}")
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(
            f"sparsify: seed must be in [-2**63, 2**64), got {seed}; pass seed % 2**64"
        )
    return torch.Generator().manual_seed(int(seed))


def _type_names(layer_types: type[nn.Module] | Sequence[type[nn.Module]]) -> list[str]:
    types = [layer_types] if isinstance(layer_types, type) else layer_types
    return [t.__name__ for t in types]


def _check_mapping_counts(
    distribution: Mapping[str, float], shapes: Mapping[str, Sequence[int]]
) -> None:
    for name, d in distribution.items():
        numel = math.prod(shapes[name]) if name in shapes else None
        if numel is not None and isinstance(d, numbers.Real) and 0 < d <= 1 and d * numel < 0.5:
            raise ValueError(
                f"sparsify: layer {name!r} has {numel} weights, too few for density {d} "
                f"(0 active); give it a density of at least {1 / numel:.3g}"
            )


def _refuse_sharded(targets: Mapping[str, nn.Module]) -> None:
    """Raise if a target weight is already sharded by ``fully_shard``."""
    sharded = [name for name, module in targets.items() if is_sharded(module.weight)]
    if sharded:
        raise ValueError(
            f"sparsify: the weights of {listed(sharded, 3)} are "
            f"already sharded (DTensor): call sparsify(model) before fully_shard(...), "
            f"then build the optimizer and the scheduler"
        )
