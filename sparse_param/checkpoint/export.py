"""Leaving the sparse training state: plain dense weights, in a model, a state dict or
a file (safetensors or ``torch.save``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..arguments import check_mapping, check_model
from ..kernels import remove_sparse_compute
from ..layers import sparse_layers, unwrap
from ..scheduler import attached_scheduler
from ..standardized import is_standardized
from .checks import STATE_DICT_FIX
from .keys import EVER, MASK, ORIGINAL, STRUCTURE, layer_prefix

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # files save_plain writes


def finalize(model: nn.Module) -> nn.Module:
    """Remove the masking parametrizations, leaving plain ``weight`` parameters that
    hold the masked weights, in place.

    The parameter objects are kept (``id`` unchanged), so an optimizer built before keeps
    working, and ``model.state_dict()`` then loads into a fresh model of the same
    architecture. Safe on deep copies (EMA models): the copy gets its own class before
    the parametrization is removed, so the model it was copied from is unaffected.

    A scheduler still attached to the model is detached first (its ``remove()``): there
    is no mask left to update or keep, so training after ``finalize`` is plain dense
    training (every weight trains, pruned ones from zero).

    Raises:
        ValueError: the model has no sparse layers, or has weight-standardized
            convolutions, whose sparse weight exists only after standardization and so
            cannot be stored as a plain timm weight.
    """
    check_model("finalize", model)
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("finalize: the model has no sparse layers")
    standardized = [layer.name for layer in layers if is_standardized(layer.module)]
    if standardized:
        raise ValueError(
            f"finalize: layers {standardized} standardize their weight in forward, so their "
            f"sparse weight exists only after standardization and no plain checkpoint can hold "
            f"it; keep the model sparse (its state_dict carries the masks) for inference"
        )
    scheduler = attached_scheduler(model)
    if scheduler is not None:
        scheduler.remove()
    for layer in layers:
        module = layer.module
        # Deep copies share the generated Parametrized* class; removing the property from
        # it would break every other copy. Give this module a class of its own first.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        remove_sparse_compute(module)  # its forward reads the parametrization
        with torch.no_grad():
            layer.weight.mul_(layer.mask)
        layer.parametrization.gradient.unhook()  # the weight's gradient goes on unmasked
        layer.parametrization.catch.unhook()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def is_sparse_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` was saved from a sparsified model."""
    check_mapping("is_sparse_state_dict", "state_dict", state_dict, STATE_DICT_FIX)
    return any(layer_prefix(key, MASK) is not None for key in state_dict)


def dense_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Turn a sparsified model's state dict into the plain one of the same architecture.

    ``<layer>.parametrizations.weight.original`` (times its mask) becomes
    ``<layer>.weight``; masks, ever-active and structure buffers are dropped.
    """
    check_mapping("dense_state_dict", "state_dict", state_dict, STATE_DICT_FIX)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if any(layer_prefix(key, suffix) is not None for suffix in (MASK, EVER, STRUCTURE)):
            continue
        prefix = layer_prefix(key, ORIGINAL)
        if prefix is not None:
            out[prefix + "weight"] = value * state_dict[prefix + MASK]
        else:
            out[key] = value
    return out


def save_safetensors(model: nn.Module, path, metadata: Mapping[str, str] | None = None) -> None:
    """Save ``model``'s weights as a plain (dense-layout) safetensors file.

    Writes ``dense_state_dict(model.state_dict())``, so the same call works for a sparse
    model (masked weights become plain ``weight`` tensors with zeros; masks and
    ever-active buffers are dropped), a finalized model, and a ``to_sparse`` model. The
    model itself is not changed. Load with ``safetensors.torch.load_file(path)`` and
    ``load_state_dict`` into a fresh model of the same architecture; timm's
    ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path))`` works
    too, but re-initializes the classifier when ``num_classes`` differs from the model
    config's. To resume sparse training,
    save ``model.state_dict()`` with ``torch.save`` instead: this file has no masks.

    Tensors are made contiguous; tensors sharing memory (tied weights) are each written
    in full, so every key of the state dict is in the file.

    Args:
        model: the model (DDP / DataParallel / ``torch.compile`` wrappers are looked
            through).
        path: file to write (``str`` or ``os.PathLike``).
        metadata: extra text metadata for the file header; ``{"format": "pt"}`` is added.

    Raises:
        ValueError: the model has weight-standardized sparse convolutions, whose sparse
            weight exists only after standardization and cannot be stored as a plain
            weight (see :func:`finalize`); or its state dict holds non-tensor entries.
    """
    from safetensors.torch import save_file  # optional dependency: sparse_param[export]

    check_model("save_safetensors", model)
    model = unwrap(model)
    standardized = [layer.name for layer in sparse_layers(model) if is_standardized(layer.module)]
    if standardized:
        raise ValueError(
            f"save_safetensors: layers {standardized} standardize their weight in forward, so "
            f"their sparse weight exists only after standardization and a plain checkpoint "
            f"cannot hold it; save model.state_dict() (with its masks) with torch.save instead"
        )
    state_dict = dense_state_dict(model.state_dict())
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"save_safetensors: state dict entry {key!r} is a {type(value).__name__}, "
                f"not a tensor; safetensors holds tensors only"
            )
    save_file(_unshared(state_dict), path, metadata={"format": "pt", **(metadata or {})})


def _unshared(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous tensors, each in full where several share memory (tied
    weights): safetensors refuses shared storage, and every key must be in the file."""
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, value in state_dict.items():
        value = value.detach()
        storage = (value.device, value.untyped_storage().data_ptr())
        if storage in seen and value.numel():
            value = value.clone()
        else:
            seen.add(storage)
        tensors[key] = value.contiguous()
    return tensors


def plain_state_dict(checkpoint: Mapping[str, Any], ema: bool = False) -> dict[str, Tensor]:
    """The plain (timm-loadable) state dict of a sparse checkpoint.

    Args:
        checkpoint: a training checkpoint as timm's ``CheckpointSaver`` writes it (the
            model under ``"state_dict"``, its EMA under ``"state_dict_ema"``; the older
            ``"model"`` / ``"model_ema"`` keys work too), or a sparse model's state dict.
        ema: take the EMA weights instead of the model's.

    Returns:
        ``dense_state_dict`` of the chosen state dict, with DDP's ``module.`` and
        ``torch.compile``'s ``_orig_mod.`` prefixes removed: masked weights under plain
        ``weight`` keys, no masks, every value a tensor.

    Raises:
        ValueError: the checkpoint has no (EMA) state dict, holds non-tensor values
            there, or is not sparse (then it loads into timm as it is).
    """
    keys = ("state_dict_ema", "model_ema") if ema else ("state_dict", "model")
    found = next((k for k in keys if isinstance(checkpoint.get(k), Mapping)), None)
    if found is not None:
        state_dict = checkpoint[found]
    elif ema or any(not isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"the checkpoint has no {' or '.join(map(repr, keys))} state dict "
            f"(top-level keys: {sorted(checkpoint)[:12]})"
            + ("; drop --ema to convert the model's weights" if ema else "")
        )
    else:
        state_dict = checkpoint  # a bare state dict
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"state dict entries {bad[:5]} are not tensors")
    if not is_sparse_state_dict(state_dict):
        raise ValueError(
            "the checkpoint holds no sparse layers (no '*.parametrizations.weight.0.mask' "
            "keys): timm loads it as it is, nothing to convert"
        )
    plain = {}
    for key, value in dense_state_dict(state_dict).items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        plain[key] = value
    return plain


def save_plain(state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a plain state dict to ``path``: safetensors for ``.safetensors``, else
    ``torch.save`` (``.pth``, ``.pt``, ``.bin``)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown format; name the file {' or '.join(SUFFIXES)}")
    tensors = _unshared(state_dict)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # optional dependency: sparse_param[export]

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
