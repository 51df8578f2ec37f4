"""Loading checkpoints: a file as the recipe and the export command read it, and a state
dict into a model, all of it or nothing."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..arguments import check_mapping, check_model
from ..layers import sparse_layers
from .checks import STATE_DICT_FIX, asking_strict, check_state_dict
from .export import is_sparse_state_dict


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``; timm's training checkpoints hold
    the run's ``argparse.Namespace``, which is allowed explicitly."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``model.load_state_dict`` that explains how to load a sparse checkpoint, and
    loads all of it or nothing.

    A sparsified model loads a sparsified checkpoint as usual (masks and ever-active
    restored exactly). A plain model given a sparse checkpoint raises a ``ValueError``
    naming the two fixes instead of torch's list of unexpected keys. The whole state
    dict is checked (:func:`sparse_param.checkpoint.check_state_dict`) before any tensor
    is copied, also when only a submodule of ``model`` was sparsified, with ``strict`` as
    given, also through a wrapper (DDP, ``torch.compile``) or a bigger model.

    Raises:
        ValueError: a sparse checkpoint for a dense model.
        RuntimeError: the checkpoint does not fit the model (keys, shapes, dtypes, or a
            sparse layer's mask / ever_active); ``model`` is left as it was.
    """
    check_model("load_state_dict", model)
    check_mapping("load_state_dict", "state_dict", state_dict, STATE_DICT_FIX)
    if is_sparse_state_dict(state_dict) and next(sparse_layers(model), None) is None:
        raise ValueError(
            "this checkpoint holds a sparse model (keys '*.parametrizations.weight.0.mask'), "
            "but the model is dense. Either call sparse_param.sparsify(model, ...) with the "
            "arguments used in training before loading, or load "
            "sparse_param.dense_state_dict(checkpoint) to get the plain weights"
        )
    if next(sparse_layers(model), None) is not None:
        check_state_dict(model, state_dict, strict)
    with asking_strict(strict):
        return model.load_state_dict(state_dict, strict=strict)
