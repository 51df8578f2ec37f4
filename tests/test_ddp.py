"""Masks agree across DDP ranks after every update (docs/architecture.md, invariants 8).

Two CPU processes (gloo, ``torch.multiprocessing`` spawn, a free port found at run time,
a timeout) train a ``DistributedDataParallel`` TinyNet on *different* data per rank with
RigL, SET and SNFS, with and without DDP's buffer broadcast (``broadcast_buffers=False``:
the masks must agree without DDP copying rank 0's buffers before every forward), and
compiled (``torch.compile`` inside DDP, as timm's train.py orders them). After
every update the ranks gather and compare their masks, ``ever_active`` and stored
weights; for RigL they also check that the dense gradients scored were the average of
the rank-local ones (rank-local gradients differ, so scoring them would not agree).
"""

from __future__ import annotations

import helpers
import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sparse_param as sp

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 12
ALGORITHMS = ["rigl", "set", "snfs"]
# (algorithm, broadcast_buffers, compiled): compiled as timm's train.py does it,
# torch.compile(model) (aot_eager) and then DDP around the compiled module
CONFIGS = [(a, b, False) for a in ALGORITHMS for b in (True, False)]
CONFIGS += [(a, True, True) for a in ALGORITHMS]


class LocalAndAveraged:
    """Records each layer's dense gradient before and after the DDP averaging."""

    def before_update(self):
        local = {layer.name: layer.parametrization.dense_grad.clone() for layer in self.layers}
        super().before_update()
        averaged = {layer.name: layer.parametrization.dense_grad.clone() for layer in self.layers}
        self.seen = (local, averaged)


class RecordingRigL(LocalAndAveraged, sp.RigL):
    pass


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def _all_equal(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


def _run(algorithm: str, broadcast_buffers: bool, compiled: bool, rank: int) -> list[dict]:
    torch._dynamo.reset()
    model = helpers.build_model(init_seed=0, density=0.2, mask_seed=0)
    inner = torch.compile(model, backend="aot_eager") if compiled else model
    ddp = DDP(inner, broadcast_buffers=broadcast_buffers)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    cls = RecordingRigL if algorithm == "rigl" else sp.ALGORITHMS[algorithm]
    scheduler = cls(ddp, optimizer, total_steps=20, update_interval=3, seed=3)
    checks = []
    for step in range(STEPS):
        old = helpers.masks(model)
        n = len(scheduler.history)
        optimizer.zero_grad()
        helpers.loss_of(ddp, helpers.batch(seed=1000 * rank + step)).backward()
        optimizer.step()
        if len(scheduler.history) == n:
            continue
        check = {"step": scheduler.step_count, "changed": False}
        check["masks"] = check["ever"] = check["weights"] = True
        for layer in scheduler.layers:
            check["changed"] |= not torch.equal(old[layer.name], layer.mask)
            check["masks"] &= _all_equal(_gather(layer.mask))
            check["ever"] &= _all_equal(_gather(layer.ever_active))
            check["weights"] &= _all_equal(_gather(layer.weight.detach()))
        if algorithm == "rigl":
            local, averaged = scheduler.seen
            check["local_grads_differ"] = check["averaged_equal"] = check["is_mean"] = True
            for name in local:
                gathered = _gather(local[name])
                check["local_grads_differ"] &= not _all_equal(gathered)
                check["averaged_equal"] &= _all_equal(_gather(averaged[name]))
                mean = torch.stack(gathered).mean(0)
                check["is_mean"] &= torch.allclose(averaged[name], mean, rtol=1e-5, atol=1e-7)
        checks.append(check)
    scheduler.remove()
    return checks


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with helpers.gloo_group(rank, world_size, port):
        results = {config: _run(*config, rank) for config in CONFIGS}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    args = (WORLD_SIZE, helpers.free_port(), str(out_dir))
    return helpers.run_ranks(_worker, args, WORLD_SIZE, out_dir, "DDP")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_ranks_hold_identical_masks_after_every_update(ddp_results, config):
    algorithm, key = config[0], config
    checks = ddp_results[0][key]
    assert checks == ddp_results[1][key], "the ranks saw different updates"
    assert [c["step"] for c in checks] == [3, 6, 9, 12]
    assert any(c["changed"] for c in checks), "no update changed a mask"
    for check in checks:
        assert check["masks"], f"masks differ across ranks after the update at {check['step']}"
        assert check["ever"], f"ever_active differs at step {check['step']}"
        assert check["weights"], f"stored weights differ at step {check['step']}"
        if algorithm == "rigl":
            assert check["local_grads_differ"], "ranks had the same data: the test is vacuous"
            assert check["averaged_equal"] and check["is_mean"], check
