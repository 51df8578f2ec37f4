"""Shared helpers for the scheduler tests (test_scheduler*.py, test_resume.py, test_ddp.py).

Imported as ``helpers`` (pytest puts ``tests/`` on ``sys.path``: the directory has no
``__init__.py``). Everything here is plain functions, usable inside hypothesis tests,
state machines and spawned DDP workers alike.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import sparse_param as sp
from sparse_param.layers import SparseLayer, sparse_layers

# ----------------------------------------------------------------------------- threads


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore. On a small shared machine, tiny
    models are ~100x slower with two contended OpenMP threads than with one; one thread
    also makes CPU results reproducible across runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ ranks


# A guard against hangs, not a time limit: a correct run on a loaded 2-core machine has
# taken 4x its quiet time (about 40 s there), so only a deadlock reaches this.
HANG_GUARD_S = 1200


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """Inside a spawned worker: one intra-op thread, a gloo process group on the loopback
    interface for the block, destroyed afterwards whatever happens."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # generous: on a loaded machine a peer can be minutes late to a collective
        timeout=timedelta(seconds=HANG_GUARD_S),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., None], args: tuple, nprocs: int, out_dir: Path, what: str
) -> list[Any]:
    """Spawn ``worker(rank, *args)`` in ``nprocs`` processes, wait for them (failing the
    test with ``what`` named if they have not finished after ``HANG_GUARD_S`` seconds:
    only a hang gets there, since a rank that raises ends the wait at once), terminate
    stragglers (only ours, by handle), and return what each rank saved as
    ``out_dir / f"rank{r}.pt"``."""
    timeout = HANG_GUARD_S
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {what} run did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(nprocs)]


# ------------------------------------------------------------------------------ models

IN_SHAPE = (2, 6, 6)  # (channels, height, width) of TinyNet's input
N_CLASSES = 5


class TinyNet(nn.Module):
    """A Conv2d and three Linear layers: four sparse layers of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)  # 4x2x3x3 = 72 weights
        self.fc1 = nn.Linear(4 * 4 * 4, 24)  # 1536
        self.fc2 = nn.Linear(24, 16)  # 384
        self.fc3 = nn.Linear(16, N_CLASSES)  # 80

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def build_model(init_seed: int = 0, density: float = 0.3, mask_seed: int = 0, **kw) -> TinyNet:
    """A TinyNet with weights from ``init_seed``, sparsified with masks from ``mask_seed``."""
    torch.manual_seed(init_seed)
    return sp.sparsify(TinyNet(), density, seed=mask_seed, **kw)


def batch(seed: int, size: int = 8) -> tuple[Tensor, Tensor]:
    """A deterministic random batch for TinyNet, a function of ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *IN_SHAPE, generator=g), torch.randint(N_CLASSES, (size,), generator=g)


def loss_of(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    x, y = data
    return F.cross_entropy(model(x), y)


def dense_twin(model: nn.Module, factory: Callable[[], nn.Module] = TinyNet) -> nn.Module:
    """A plain (unparametrized) copy of ``model`` computing with the same weights; its
    weight gradients are the dense gradients dL/dW of the sparse model."""
    twin = factory()
    twin.load_state_dict(sp.dense_state_dict(model.state_dict()))
    return twin


def dense_grads(model: nn.Module, batches, scale: float = 1.0, factory=TinyNet) -> dict:
    """Dense gradient dL/dW of every sparse layer, summed over ``batches`` (times
    ``scale``), computed on a dense twin: an independent reference for the captured one."""
    twin = dense_twin(model, factory)
    for data in batches:
        (loss_of(twin, data) * scale).backward()
    return {
        layer.name: twin.get_submodule(layer.name).weight.grad for layer in sparse_layers(model)
    }


# -------------------------------------------------------------------------- optimizers


def _timm(name: str, **kw) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(model, name, **kw)

    return make


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, momentum=0.9),
    "timm_lamb": _timm("lamb", lr=1e-2, weight_decay=0.01),
    "timm_lion": _timm("lion", lr=1e-3, weight_decay=0.01),
    "timm_adan": _timm("adan", lr=1e-2, weight_decay=0.01),
    "timm_adopt": _timm("adopt", lr=1e-2, weight_decay=0.01),
}


# ------------------------------------------------------------------------ observations


def masks(model: nn.Module) -> dict[str, Tensor]:
    return {layer.name: layer.mask.clone() for layer in sparse_layers(model)}


def ever_actives(model: nn.Module) -> dict[str, Tensor]:
    return {layer.name: layer.ever_active.clone() for layer in sparse_layers(model)}


def stored_weights(model: nn.Module) -> dict[str, Tensor]:
    return {layer.name: layer.weight.detach().clone() for layer in sparse_layers(model)}


def counts(model: nn.Module) -> dict[str, int]:
    return {layer.name: layer.active for layer in sparse_layers(model)}


def weight_shaped_state(optimizer: torch.optim.Optimizer, layer: SparseLayer) -> dict[str, Tensor]:
    """The optimizer state tensors of ``layer``'s weight that are shaped like it."""
    state = optimizer.state.get(layer.weight, {})
    return {
        k: v for k, v in state.items() if isinstance(v, Tensor) and v.shape == layer.weight.shape
    }


def check_invariants(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """docs/architecture.md, invariants 1, 2, 4 (containment), 5 (optimizer state), ≥ 1 active.

    The computed weight is checked in training *and* evaluation mode (the parametrization
    takes different paths); the model's mode is restored.
    """
    layers = list(sparse_layers(model))
    assert layers, "no sparse layers"
    for layer in layers:
        where = f"layer {layer.name!r}"
        stored, mask, ever = layer.weight, layer.mask, layer.ever_active
        for buf in (mask, ever):
            assert buf.dtype == torch.bool, where
            assert buf.shape == stored.shape, where
            assert buf.device == stored.device, where
        assert bool((stored[~mask] == 0).all()), f"{where}: stored inactive weights not 0"
        assert bool((ever | ~mask).all()), f"{where}: ever_active misses active weights"
        assert layer.active >= 1, f"{where}: no active weight"
        if optimizer is not None:
            for key, value in weight_shaped_state(optimizer, layer).items():
                assert bool((value[~mask] == 0).all()), f"{where}: state {key!r} not 0"
    was_training = model.training
    try:
        for training in (True, False):
            model.train(training)
            for layer in layers:
                where = f"layer {layer.name!r} (train={training})"
                computed, mask = layer.module.weight, layer.mask
                assert bool((computed[~mask] == 0).all()), f"{where}: computes off the mask"
                assert torch.equal(computed[mask], layer.weight[mask]), where
    finally:
        model.train(was_training)


def mask_changes(old: dict[str, Tensor], new: dict[str, Tensor]) -> tuple[dict, dict]:
    """Per layer, the bool tensors of pruned (``old & ~new``) and grown (``new & ~old``)."""
    pruned = {n: old[n] & ~new[n] for n in old}
    grown = {n: new[n] & ~old[n] for n in old}
    return pruned, grown


def set_capture(model: nn.Module, on: bool) -> None:
    """Arm (or disarm) the dense-gradient capture of every sparse layer by hand."""
    for layer in sp.sparse_layers(model):
        layer.parametrization.capture_dense_grad = on


def arm_and_capture(scheduler: sp.SparseScheduler, model: nn.Module, data) -> None:
    """Capture a dense gradient by hand (for an explicit ``update()`` of a gradient-based
    algorithm outside the step before a scheduled update)."""
    for layer in scheduler.layers:
        layer.parametrization.capture_dense_grad = True
    scheduler.optimizer.zero_grad()
    loss_of(model, data).backward()


def record_zeroing_passes(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Every tensor the library zeroes where inactive from now on (stored weights by the
    mask, gradients by the gradient masking, optimizer state before a step), in order."""
    from sparse_param import gradients, mask, zeros
    from sparse_param.scheduler import zeroing

    passes: list[Tensor] = []

    def recording(tensor: Tensor, where: Tensor) -> Tensor:
        passes.append(tensor)
        return zeros.zero_where_inactive_(tensor, where)

    for module in (mask, gradients, zeroing):
        monkeypatch.setattr(module, "zero_where_inactive_", recording)
    return passes
