"""Checkpoints of sparse models: keys, checks before loading, loading helpers, export.

* :mod:`~sparse_param.checkpoint.keys`: the state-dict keys of a sparse layer.
* :mod:`~sparse_param.checkpoint.checks`: :func:`check_state_dict` and the load pre-hook
  ``sparsify`` installs, which make every load all-or-nothing (the module says how the
  caller's ``strict`` reaches the hook).
* :mod:`~sparse_param.checkpoint.loading`: :func:`load_checkpoint_file` and
  :func:`load_state_dict`.
* :mod:`~sparse_param.checkpoint.export`: plain dense weights (:func:`finalize`,
  :func:`dense_state_dict`, :func:`save_safetensors`, :func:`plain_state_dict`), which
  ``python -m sparse_param.export`` writes from a training checkpoint.
* :mod:`~sparse_param.checkpoint.dcp`: a scheduler in a ``torch.distributed.checkpoint``
  checkpoint (:class:`SchedulerState`).
"""

from .checks import asking_strict, check_before_load, check_state_dict
from .dcp import SchedulerState, load_scheduler_state
from .export import (
    SUFFIXES,
    dense_state_dict,
    finalize,
    is_sparse_state_dict,
    plain_state_dict,
    save_plain,
    save_safetensors,
)
from .loading import load_checkpoint_file, load_state_dict

__all__ = [
    "SUFFIXES",
    "SchedulerState",
    "asking_strict",
    "check_before_load",
    "check_state_dict",
    "dense_state_dict",
    "finalize",
    "is_sparse_state_dict",
    "load_checkpoint_file",
    "load_scheduler_state",
    "load_state_dict",
    "plain_state_dict",
    "save_plain",
    "save_safetensors",
]
