"""The scheduler's hooks on its optimizer: counting steps, and riding in its state dict.

A script that checkpoints and resumes the optimizer (timm's ``CheckpointSaver`` and
``resume_checkpoint``) resumes the topology schedule too: the scheduler's state is stored
under ``optimizer.state_dict()["sparse_param"]``. Loading checks it in the pre-hook
(before torch loads anything, so a refused state leaves the optimizer untouched) and
assigns it in the post-hook (once torch accepted the optimizer state, so a refused
optimizer state leaves the scheduler untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

OPTIMIZER_STATE_KEY = "sparse_param"  # where the scheduler's state sits in optimizer.state_dict()


class OptimizerHooks:
    """Hooks of one scheduler on ``optimizer``.

    Args:
        optimizer: the optimizer.
        on_step: called after every real optimizer step (None: steps are counted by
            hand); a step an AMP ``GradScaler`` skips runs no post-hook.
        state: the scheduler's ``state_dict``.
        check: raises ``ValueError`` for a state that cannot be loaded.
        load: the scheduler's ``load_state_dict``.
        unrestored: called once torch has loaded an optimizer state that holds no
            scheduler state.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        on_step: Callable[[], None] | None,
        state: Callable[[], dict[str, Any]],
        check: Callable[[Any], None],
        load: Callable[[Mapping[str, Any]], None],
        unrestored: Callable[[], None],
    ) -> None:
        self._state, self._check, self._load = state, check, load
        self._unrestored = unrestored
        self._pending: Mapping[str, Any] | None = None  # checked, waiting for the post-hook
        self._step = (
            None
            if on_step is None
            else optimizer.register_step_post_hook(lambda optimizer, args, kwargs: on_step())
        )
        self._handles = [
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._check_loading),
            optimizer.register_load_state_dict_post_hook(self._assign_loaded),
        ]

    @property
    def counts_steps(self) -> bool:
        """Whether optimizer steps are counted by the step post-hook."""
        return self._step is not None

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in [self._step, *self._handles]:
            if handle is not None:
                handle.remove()
        self._step, self._handles = None, []

    def _save(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        state[OPTIMIZER_STATE_KEY] = self._state()

    def _check_loading(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> dict[str, Any]:
        state = dict(state)
        ours = state.pop(OPTIMIZER_STATE_KEY, None)
        if ours is not None:
            self._check(ours)
        self._pending = ours
        return state

    def _assign_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        ours, self._pending = self._pending, None
        if ours is not None:
            self._load(ours)
        else:
            self._unrestored()
