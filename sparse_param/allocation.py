"""Layer allocation: how many weights of each layer are active.

Pure functions from layer shapes and a target density to exact integer active counts.
Every distribution reduces to one step, :func:`apportion`: share an integer budget in
proportion to per-layer weights, respecting per-layer bounds, with largest-remainder
rounding so the counts add up exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

from .structure import Structure, check_shape, fan_in_of, parse_structure

DISTRIBUTIONS = ("uniform", "er", "erk")


def apportion(
    total: int,
    weights: Sequence[float],
    lower: Sequence[int],
    upper: Sequence[int],
) -> list[int]:
    """Split ``total`` integer units in proportion to ``weights`` within bounds.

    Each share is ``s * weights[i]`` for one common scale ``s``; a share that falls
    outside ``[lower[i], upper[i]]`` is clamped to the bound and ``s`` is solved again
    over the others, until none is out of bounds (the ERK dense-capping rule). The real
    shares are then rounded down and the remainder handed out one unit at a time to the
    largest fractional parts (ties to the lower index).

    Returns a list of ints ``c`` with ``sum(c) == total`` and ``lower <= c <= upper``.
    Raises ``ValueError`` when ``sum(lower) <= total <= sum(upper)`` does not hold.
    """
    n = len(weights)
    if not (len(lower) == len(upper) == n):
        raise ValueError("apportion: weights, lower and upper must have the same length")
    if any(lo > hi for lo, hi in zip(lower, upper)):
        raise ValueError("apportion: a lower bound exceeds its upper bound")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError("apportion: weights must be finite and non-negative")
    if not sum(lower) <= total <= sum(upper):
        raise ValueError(
            f"apportion: cannot share {total} units within bounds summing to "
            f"[{sum(lower)}, {sum(upper)}]"
        )
    if total > sum(hi if w > 0 else lo for w, lo, hi in zip(weights, lower, upper)):
        # The weighted shares are full: those of weight zero take the rest by room.
        return apportion(
            total,
            [0.0 if w > 0 else float(hi - lo) for w, lo, hi in zip(weights, lower, upper)],
            [hi if w > 0 else lo for w, lo, hi in zip(weights, lower, upper)],
            upper,
        )

    def shares_at(scale: float) -> list[float]:
        return [min(hi, max(lo, scale * w)) for w, lo, hi in zip(weights, lower, upper)]

    # sum(shares_at(s)) grows monotonically with s: bisect for the scale that meets
    # the budget. Clamping at the bounds is the ERK rule "make dense, solve again".
    low, high = 0.0, max((hi / w for w, hi in zip(weights, upper) if w > 0), default=0.0)
    for _ in range(200):
        mid = (low + high) / 2
        if sum(shares_at(mid)) < total:
            low = mid
        else:
            high = mid
    shares = shares_at(high)

    counts = [math.floor(s) for s in shares]  # within bounds: the bounds are integers
    remainder = total - sum(counts)  # < n, as every share lost less than one unit
    by_fraction = sorted(range(n), key=lambda i: (counts[i] - shares[i], i))
    for i in by_fraction[:remainder]:
        counts[i] += 1
    return counts


def layer_scores(shape: Sequence[int], distribution: str) -> float:
    """Relative density of one layer under ``distribution`` (before scaling).

    ``shape`` is the weight shape, ``(out, in)`` for Linear and ``(out, in/groups,
    *kernel)`` for convolutions. ``"uniform"`` gives 1; ``"er"`` gives
    ``(n_in + n_out) / (n_in * n_out)`` over the two channel dims; ``"erk"`` gives the
    sum of all dims over their product.
    """
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
        return (n_in + n_out) / (n_in * n_out)
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def allocate(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str | Mapping[str, float] = "erk",
    structure: str | Structure | None = None,
) -> dict[str, int]:
    """Active weight count per layer.

    Args:
        shapes: layer name to weight shape, in model order.
        density: overall share of active weights, in (0, 1].
        distribution: ``"uniform"``, ``"er"``, ``"erk"``, or a mapping from layer name
            to that layer's density; layers the mapping leaves out get ``density``.
        structure: None (unstructured), ``"fan_in"`` or ``"N:M"``: counts that a mask of
            that structure can hold (see :func:`allocate_structured`).

    Returns:
        Layer name to active count. With a named distribution the counts add up to
        ``round(density * total)`` exactly (at least one per layer, at most the layer's
        size); with a mapping each layer gets ``round(d * numel)``, at least 1.
    """
    _check_shapes(shapes)
    parsed = parse_structure(structure)
    if parsed is not None:
        return allocate_structured(shapes, density, distribution, parsed)
    density = _check_density(density, "density")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if not sizes:
        raise ValueError("allocate: no layers to allocate")
    if any(size == 0 for size in sizes.values()):
        empty = [name for name, size in sizes.items() if size == 0]
        raise ValueError(f"allocate: layers with no weights: {empty}")
    if isinstance(distribution, Mapping):
        unknown = sorted(set(distribution) - set(shapes))
        if unknown:
            raise ValueError(
                f"distribution names layers that are not sparse targets: {unknown}; "
                f"valid names are {list(shapes)}"
            )
        given = {n: _check_density(d, f"density of {n!r}") for n, d in distribution.items()}
        return {
            name: max(1, round(given.get(name, density) * size)) for name, size in sizes.items()
        }

    names = list(shapes)
    total = round(density * sum(sizes.values()))
    if total < len(names):
        raise ValueError(
            f"density {density} gives {total} active weights for {len(names)} layers; every "
            f"layer needs at least one: raise the density or exclude small layers"
        )
    weights = [layer_scores(shapes[n], distribution) * sizes[n] for n in names]
    counts = apportion(total, weights, [1] * len(names), [sizes[n] for n in names])
    return dict(zip(names, counts))


def allocate_structured(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str | Mapping[str, float],
    structure: Structure,
) -> dict[str, int]:
    """Active count per layer for a structured mask (see :func:`allocate`).

    ``"fan_in"``: the distribution's exact counts, each rounded to a whole number of
    units, ``k · out`` with ``1 <= k <= fan_in``; the total is then within half a unit per
    layer of ``round(density · total)``. ``"N:M"``: every layer gets ``N/M`` of its
    weights whatever the distribution (the structure fixes it), and ``density`` must be
    ``N/M``; a mapping distribution is refused.
    """
    for name, shape in shapes.items():
        check_shape(shape, structure, repr(name))
    if structure.kind == "n:m":
        if isinstance(distribution, Mapping):
            raise ValueError(
                f"structure {structure} fixes every layer's density at N/M = "
                f"{structure.n / structure.m}; a per-layer distribution mapping cannot apply"
            )
        density = _check_density(density, "density")
        if not math.isclose(density, structure.n / structure.m, rel_tol=1e-9):
            raise ValueError(
                f"structure {structure} gives density N/M = {structure.n}/{structure.m} = "
                f"{structure.n / structure.m}, but density={density} was asked: pass "
                f"density={structure.n / structure.m}, or an N:M whose ratio is {density}"
            )
        return {name: math.prod(s) * structure.n // structure.m for name, s in shapes.items()}
    counts = allocate(shapes, density, distribution)
    out: dict[str, int] = {}
    for name, shape in shapes.items():
        k = min(max(round(counts[name] / shape[0]), 1), fan_in_of(shape))
        out[name] = k * shape[0]
    return out


def _check_density(value: float, what: str) -> float:
    """``value`` as a Python float (numpy scalars accepted) in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in (0, 1], got {type(value).__name__}")
    if not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value}")
    return float(value)


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> None:
    for name, shape in shapes.items():
        if (
            isinstance(shape, (str, bytes))
            or not isinstance(shape, Sequence)
            or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0
                for d in shape
            )
        ):
            raise TypeError(
                f"allocate: the shape of {name!r} must be a sequence of non-negative ints "
                f"(such as tuple(weight.shape)), got {shape!r}"
            )
