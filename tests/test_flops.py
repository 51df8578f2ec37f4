"""Training FLOPs: exact counts for a hand-computed MLP, conv weight uses, and the
history-rebuilt count against a per-step counter run alongside training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _tiny_mlp() -> nn.Sequential:
    """Linear(4, 3) with 6 of 12 weights active, Linear(3, 2) with 3 of 6."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sp.sparsify(model, distribution={"0": 0.5, "2": 0.5})
    assert [layer.active for layer in sp.sparse_layers(model)] == [6, 3]
    return model


def test_static_mlp_by_hand():
    model = _tiny_mlp()
    # per sample and step: 2 FLOPs x (forward + input grad + weight grad) x active
    # = 6 x (6 + 3) = 54; 5 steps of batch 2
    assert sp.training_flops(model, steps=5, batch_size=2) == 540
    assert sp.dense_training_flops(model, 5, batch_size=2) == 6 * (12 + 6) * 5 * 2
    scheduler = sp.Static(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert sp.training_flops(model, scheduler, steps=5) == 270


def test_rigl_mlp_by_hand_pays_dense_weight_gradients_on_update_steps():
    model = _tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sp.RigL(model, optimizer, total_steps=10, update_interval=2)
    for _ in range(4):  # updates after steps 2 and 4 (dense gradients captured there)
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
        optimizer.step()
    assert [r["step"] for r in scheduler.history] == [2, 4]
    sparse_step = 6 * (6 + 3)  # 54
    dense_grad_step = 2 * ((2 * 6 + 12) + (2 * 3 + 6))  # 72
    assert sp.training_flops(model, scheduler) == 2 * sparse_step + 2 * dense_grad_step
    assert sp.training_flops(model, scheduler, steps=3) == 2 * sparse_step + dense_grad_step


def test_dense_model_and_kept_dense_layers_count_every_weight():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert sp.training_flops(model, steps=1) == 6 * 18
    sp.sparsify(model, distribution={"0": 0.5}, dense_last=True)
    assert sp.training_flops(model, steps=1) == 6 * (6 + 6)
    with pytest.raises(ValueError, match="give steps"):
        sp.training_flops(model)


def test_conv_weight_uses_are_output_positions_and_leave_the_model_as_it_was():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),  # 5x5 out: 25 uses
        nn.BatchNorm2d(2),
        nn.Conv2d(2, 4, 3, stride=2),  # 2x2 out: 4 uses
        nn.Flatten(),
        nn.Linear(16, 3),  # 1 use
    )
    model.train()
    stats = model[1].running_mean.clone()
    uses = sp.weight_uses(model, torch.randn(2, 1, 5, 5))
    assert uses == {"0": 25, "2": 4, "4": 1}
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, stats)
    per_step = 6 * (18 * 25 + 72 * 4 + 48 * 1)
    assert sp.training_flops(model, steps=1, uses=uses) == per_step


class _PerStepCounter:
    """Independent count: read the active counts and whether the dense gradient is
    captured before every optimizer step, as the demo used to."""

    def __init__(self, model: nn.Module, scheduler) -> None:
        self.model, self.scheduler, self.flops = model, scheduler, 0

    def before_step(self) -> None:
        dense = self.scheduler.wants_dense_grad(self.scheduler.step_count + 1)
        for layer in sp.sparse_layers(self.model):
            self.flops += 2 * (2 * layer.active + (layer.numel if dense else layer.active))


@given(
    method=st.sampled_from(["set", "rigl", "snfs", "dsr", "gmp", "granet"]),
    interval=st.integers(1, 4),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**10),
)
def test_history_rebuilt_count_equals_a_per_step_count(method, interval, steps, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    )
    pruning = method in ("gmp", "granet")
    sp.sparsify(model, 1.0 if pruning else 0.3, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {"density": 0.3} if pruning else {}
    scheduler = sp.ALGORITHMS[method](
        model, optimizer, total_steps=12, update_interval=interval, seed=seed, **kwargs
    )
    counter = _PerStepCounter(model, scheduler)
    for _ in range(steps):
        counter.before_step()
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
        optimizer.step()
    assert sp.training_flops(model, scheduler) == counter.flops


def test_resumed_count_continues_from_the_checkpoint_with_start():
    """DSR moves counts between layers; a checkpoint keeps one history record, so the
    resumed process counts from the resumed step and adds the FLOPs kept before it."""

    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
        sp.sparsify(model, 0.4, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        scheduler = sp.DSR(
            model, optimizer, total_steps=24, update_interval=2, threshold=0.05, history_size=1
        )
        return model, optimizer, scheduler

    def run(model, optimizer, scheduler, counter, steps, first):
        for i in range(first, first + steps):
            counter.before_step()
            optimizer.zero_grad()
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    model, optimizer, scheduler = build()
    counter = _PerStepCounter(model, scheduler)
    run(model, optimizer, scheduler, counter, 10, 0)
    saved = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "flops": sp.training_flops(model, scheduler),
    }
    assert saved["flops"] == counter.flops
    run(model, optimizer, scheduler, counter, 10, 10)

    resumed, resumed_opt, resumed_sched = build(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_sched.load_state_dict(saved["scheduler"])
    assert resumed_sched.num_updates > len(resumed_sched.history)  # early records are gone
    run(resumed, resumed_opt, resumed_sched, _PerStepCounter(resumed, resumed_sched), 10, 10)
    counts = [layer.active for layer in sp.sparse_layers(model)]
    assert [layer.active for layer in sp.sparse_layers(resumed)] == counts
    assert counts != [24, 12]  # DSR moved weights between layers
    later = sp.training_flops(resumed, resumed_sched, start=10)
    assert saved["flops"] + later == counter.flops
    with pytest.raises(ValueError, match=r"holds \d+ of the run's \d+ updates"):
        sp.training_flops(resumed, resumed_sched)
