"""A scheduler's checkpoint: what it holds, how it is checked, how it is loaded.

Every scheduler saves the same base entries (algorithm, layers, counters, generator,
recent update records). An algorithm's own state is *declared*: a class attribute
``state_fields`` maps an attribute name to a :class:`Field`, which says what a valid
saved value is and how it is loaded. The base saves, checks and loads them all, so no
algorithm writes ``state_dict`` or ``load_state_dict``. A whole state is checked before
anything is assigned: a state that does not fit raises ``ValueError`` and changes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from ..layers import SparseLayer

BASE_KEYS = ("algorithm", "layers", "step_count", "num_updates", "generator", "history")


class Field:
    """One declared entry of an algorithm's state, kept as the attribute of its name."""

    averaged = False  # tensors averaged over DDP ranks before every update

    def problem(self, name: str, value: Any, owner: Any) -> str | None:
        """What is wrong with the saved ``value`` for ``owner`` (a scheduler), or None."""
        raise NotImplementedError

    def save(self, value: Any) -> Any:
        """The value as it goes into the state dict (a copy, never the live object)."""
        return value

    def load(self, current: Any, saved: Any) -> Any:
        """The attribute's new value, from its ``current`` value and a checked ``saved``."""
        return saved


class PositiveReal(Field):
    """A positive finite float (DSR's threshold)."""

    def problem(self, name: str, value: Any, owner: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, float) or not 0 < value < math.inf:
            return f"{name} must be a positive finite float, got {value!r}"
        return None

    def load(self, current: Any, saved: Any) -> float:
        return float(saved)


class LayerCounts(Field):
    """One int per sparse layer, each in ``[minimum, numel]``.

    Args:
        minimum: the smallest valid count, or a function of the scheduler giving one
            per layer (GMP: its final counts).
    """

    def __init__(self, minimum: int | Callable[[Any], Sequence[int]] = 1) -> None:
        self.minimum = minimum

    def problem(self, name: str, value: Any, owner: Any) -> str | None:
        layers = owner.layers
        lows = self.minimum(owner) if callable(self.minimum) else [self.minimum] * len(layers)
        if (
            isinstance(value, list)
            and len(value) == len(layers)
            and all(
                isinstance(n, int) and not isinstance(n, bool) and low <= n <= layer.numel
                for n, low, layer in zip(value, lows, layers)
            )
        ):
            return None
        bound = "the layer's final count" if callable(self.minimum) else str(self.minimum)
        return (
            f"{name} must be a list of {len(layers)} ints (one per sparse layer), each "
            f"between {bound} and the layer's size, got {value!r}"
        )

    def save(self, value: Any) -> list[int]:
        return list(value)

    def load(self, current: Any, saved: Any) -> list[int]:
        return [int(n) for n in saved]


class LayerTensors(Field):
    """One float tensor per sparse layer, shaped like its weight (SNFS's momentum).

    Args:
        averaged: average over DDP ranks before every update (state that sums the
            rank's own gradients between updates).
    """

    def __init__(self, averaged: bool = False) -> None:
        self.averaged = averaged

    def problem(self, name: str, value: Any, owner: Any) -> str | None:
        layers = owner.layers
        if (
            isinstance(value, list)
            and len(value) == len(layers)
            and all(
                isinstance(t, Tensor) and t.is_floating_point() and t.shape == layer.mask.shape
                for t, layer in zip(value, layers)
            )
        ):
            return None
        return f"{name} must be a list of {len(layers)} float tensors shaped like the weights"

    def save(self, value: Any) -> list[Tensor]:
        return [t.clone() for t in value]

    def load(self, current: Any, saved: Any) -> list[Tensor]:
        for tensor, value in zip(current, saved):
            tensor.copy_(value)  # in place: the tensors keep their device and dtype
        return current


def layer_list(layers: Sequence[SparseLayer]) -> list[list[Any]]:
    """The layers as a state dict records them: ``[name, shape]`` each."""
    return [[layer.name, list(layer.mask.shape)] for layer in layers]


def check_base(owner: str, state: Any, layers: list[list[Any]], generator: Tensor) -> None:
    """Raise ``ValueError`` unless ``state`` holds valid base entries of ``owner`` (the
    algorithm's class name) over ``layers`` (:func:`layer_list`); ``generator`` is the
    scheduler's own generator state, for its dtype and shape."""
    where = f"{owner}.load_state_dict"
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: expected the dict of state_dict(), got {type(state)}")
    saved = state.get("algorithm")
    if saved is None:
        raise ValueError(
            f"{where}: the state has no 'algorithm' entry (keys {sorted(state)}): it was "
            f"not saved by a sparse_param scheduler of this version"
        )
    if saved != owner:
        raise ValueError(
            f"{where}: the state was saved by a {saved} scheduler and this one is {owner}; "
            f"create a {saved} scheduler to resume it, or start {owner} without loading it"
        )
    _check_layers(where, state.get("layers"), layers)
    for key in ("step_count", "num_updates"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {key} must be an int ≥ 0, got {value!r}")
    saved_generator = state.get("generator")
    if not (
        isinstance(saved_generator, Tensor)
        and saved_generator.dtype == generator.dtype
        and saved_generator.shape == generator.shape
    ):
        raise ValueError(
            f"{where}: generator must be a {generator.dtype} tensor of shape "
            f"{tuple(generator.shape)} (torch.Generator.get_state())"
        )
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(r, Mapping) for r in history):
        raise ValueError(f"{where}: history must be a list of update records (dicts)")


def _check_layers(where: str, theirs: Any, layers: list[list[Any]]) -> None:
    if theirs == layers:
        return
    saved = theirs if isinstance(theirs, list) else []
    count = len(saved) if isinstance(theirs, list) else "?"
    differ = next((f"saved {s}, here {o}" for s, o in zip(saved, layers) if s != o), "")
    raise ValueError(
        f"{where}: the state was saved for {count} sparse layers and "
        f"this model has {len(layers)} ({differ or 'names or shapes differ'}); load it into "
        f"the model it was saved from (same architecture and sparsify targets)"
    )


def check_fields(owner: Any, state: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless every field ``owner`` declares is valid in ``state``."""
    for name, field in type(owner).state_fields.items():
        problem = field.problem(name, state.get(name), owner)
        if problem is not None:
            raise ValueError(f"{type(owner).__name__}.load_state_dict: {problem}")


def save_fields(owner: Any) -> dict[str, Any]:
    """The declared fields of ``owner`` as state dict entries."""
    return {name: f.save(getattr(owner, name)) for name, f in type(owner).state_fields.items()}


def load_fields(owner: Any, state: Mapping[str, Any]) -> None:
    """Assign the declared fields of ``owner`` from a checked ``state``."""
    for name, field in type(owner).state_fields.items():
        setattr(owner, name, field.load(getattr(owner, name), state[name]))
