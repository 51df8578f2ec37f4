"""The run behind ``tests/fixtures/legacy_checkpoints.pt``: a checkpoint written by the
library as it was before the restructuring (commit e27b949), and where that run went.

``python tests/legacy_run.py`` (run once, on that commit) trains a small model for
``SAVED_AT`` steps per algorithm, keeps the model, optimizer and scheduler state dicts,
trains on to ``END`` and keeps the end state. ``tests/test_legacy_checkpoint.py`` loads
the saved states into today's library, trains the same steps, and asserts the same end,
bit for bit. Model, data and optimizer are defined here, not taken from the library or
the test helpers, so that neither can drift from what was saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparse_param as sp

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_checkpoints.pt"
SAVED_AT, END = 10, 22  # an update at 9 is in the past; capture armed at 11, update at 12
ALGORITHMS = {  # name: (sparsify keyword arguments, scheduler keyword arguments)
    "rigl": ({"density": 0.3}, {}),
    "snfs": ({"density": 0.3}, {}),
    "dsr": ({"density": 0.3}, {"threshold": 0.05, "doublings": 0}),
    "granet": ({"density": 0.6}, {"density": 0.2}),
    "srigl": ({"density": 0.3, "structure": "fan_in"}, {}),
}


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """Model, optimizer and scheduler of ``name``'s run, as at step 0."""
    sparsify_kwargs, scheduler_kwargs = ALGORITHMS[name]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, 5),
    )  # fmt: skip
    sp.sparsify(model, seed=1, **sparsify_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    scheduler = sp.ALGORITHMS[name](
        model, optimizer, total_steps=END, update_interval=3, seed=2, **scheduler_kwargs
    )
    return model, optimizer, scheduler


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """One SGD step per index, on a batch that is a function of the index only."""
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(6, 3, 6, 6, generator=g), torch.randint(5, (6,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def record() -> dict[str, dict]:
    """For every algorithm, the states at ``SAVED_AT`` and the end state at ``END``."""
    runs = {}
    for name in ALGORITHMS:
        model, optimizer, scheduler = build(name)
        train(model, optimizer, range(SAVED_AT))
        saved = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        saved = {k: _detached(v) for k, v in saved.items()}
        train(model, optimizer, range(SAVED_AT, END))
        assert scheduler.num_updates >= 4, (name, scheduler.num_updates)
        runs[name] = {
            "saved": saved,
            "end_model": _detached(model.state_dict()),
            "end_optimizer": _detached(optimizer.state_dict()),
            "end_history": scheduler.state_dict()["history"],
        }
    return runs


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.save(record(), FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
