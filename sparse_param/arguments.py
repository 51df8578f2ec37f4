"""Validating what a user passes in (models, optimizers, state dicts, numbers): errors
that name the function or class called, what was given, and the fix."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def listed(names: Sequence[str], limit: int = 5) -> str:
    """Names for an error message: the first ``limit`` as a list, then how many more."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def describe(value: Any) -> str:
    """What a wrong argument is, in a few words (never a tensor's whole repr)."""
    if value is None:
        return "None"
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_model(owner: str, model: Any, name: str = "model") -> None:
    """Raise ``TypeError`` unless ``model`` (the argument ``name``) is an ``nn.Module``
    (wrappers such as DDP and torch.compile's are); ``owner`` is the function or class
    the user called."""
    if isinstance(model, nn.Module):
        return
    hint = "pass the nn.Module itself"
    if model is None:
        hint += " (a function meant to return the model may have returned None)"
    if isinstance(model, Mapping):
        hint = (
            "a state dict is not a model: load it with model.load_state_dict(...), then pass model"
        )
    elif isinstance(model, Tensor):
        hint = "pass the module that holds this tensor, not the tensor"
    raise TypeError(f"{owner}: {name} must be a torch.nn.Module, got {describe(model)}; {hint}")


def check_optimizer(owner: str, optimizer: Any) -> None:
    """Raise ``TypeError`` unless ``optimizer`` is a ``torch.optim.Optimizer``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return
    swapped = (
        " (the model was passed where the optimizer goes)"
        if isinstance(optimizer, nn.Module)
        else ""
    )
    raise TypeError(
        f"{owner}: optimizer must be a torch.optim.Optimizer, got {describe(optimizer)}"
        f"{swapped}; build it with torch.optim.SGD(model.parameters(), lr=...) (any "
        f"torch.optim optimizer) and pass (model, optimizer)"
    )


def check_mapping(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise ``TypeError`` unless ``value`` is a mapping (a state dict); ``fix`` says
    where the right one comes from."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{owner}: {name} must be a mapping, got {describe(value)}; {fix}")


def check_int(owner: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted), refusing anything below
    ``minimum`` or above ``maximum``; errors name ``owner`` (the class the user called)
    and ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{owner}: {name} must be a whole number, got {value!r}")
    if not float(value) >= minimum:
        raise ValueError(f"{owner}: {name} must be an int ≥ {minimum}, got {value!r}")
    if maximum is not None and int(value) > maximum:
        raise ValueError(f"{owner}: {name} must be an int ≤ {maximum}, got {value!r}")
    return int(value)


def check_real(
    owner: str, name: str, value: Any, low: float, high: float, *, open_low: bool = False,
    open_high: bool = False,
) -> float:  # fmt: skip
    """``value`` as a Python float (numpy scalars accepted) in ``[low, high]``, each end
    excluded where ``open_low`` / ``open_high``; NaN never passes. Errors name ``owner``
    (the class the user called) and ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return value
