"""FSDP2 (``fully_shard``): sparse training equal to the unsharded run, DCP resume.

Two CPU processes (gloo, loopback, ``torch.multiprocessing`` spawn, as in test_ddp.py)
train a TinyNet sharded with ``fully_shard`` (fc1, fc2, then the root), each rank on its
half of every global batch, with every algorithm. After every step the ranks compare
their masks and ``ever_active`` (identical), and check the invariants on the gathered
weights and optimizer state. The final masks must equal, and the weights match within
float tolerance (the reduce-scatter averages the two half-batch gradients in another
order than one full-batch backward sums them), a single-process run on the whole batches
with the same seeds. A run saved mid-way with ``torch.distributed.checkpoint`` (model,
optimizer, scheduler) and resumed in freshly built, sharded models ends bit-identical to
the uninterrupted one; the sharded checkpoint converts to a plain one that a plain
sparse model loads.
"""

from __future__ import annotations

import helpers
import pytest
import torch
import torch.distributed as dist

import sparse_param as sp

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
ALGORITHMS = ["static", "set", "rigl", "srigl", "snfs", "dsr", "gmp", "granet"]
PRUNING = {"gmp", "granet"}
STEPS, SAVE_AT = 7, 4  # updates at steps 3 and 6


def build(algorithm: str, shard: bool):
    from torch.distributed.fsdp import fully_shard

    structure = {"structure": "fan_in"} if algorithm == "srigl" else {}
    model = helpers.build_model(density=0.5 if algorithm in PRUNING else 0.3, **structure)
    if shard:
        for module in (model.fc1, model.fc2, model):
            fully_shard(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = {} if algorithm == "static" else {"total_steps": 12, "update_interval": 3}
    if algorithm in PRUNING:
        kw["density"] = 0.2
    if algorithm == "dsr":  # a fixed interval (updates at 3 and 6), a threshold that bites
        kw.update(doublings=0, threshold=0.05)
    return model, optimizer, sp.ALGORITHMS[algorithm](model, optimizer, **kw)


def train(model, optimizer, steps, rank: int | None = None):
    for i in steps:
        x, y = helpers.batch(i, 8)
        if rank is not None:  # this rank's half of the global batch
            x, y = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
        optimizer.zero_grad()
        helpers.loss_of(model, (x, y)).backward()
        optimizer.step()


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Masks, ever_active, gathered weights and momentum of every sparse layer."""
    out = {}
    for layer in sp.sparse_layers(model):
        momentum = optimizer.state[layer.weight]["momentum_buffer"]
        out[f"{layer.name}.mask"] = layer.mask.clone()
        out[f"{layer.name}.ever_active"] = layer.ever_active.clone()
        out[f"{layer.name}.weight"] = layer.weight.full_tensor()
        out[f"{layer.name}.momentum"] = momentum.full_tensor()
    return out


def check_ranks_agree_and_invariants(model, optimizer) -> None:
    state = full_state(model, optimizer)
    for layer in sp.sparse_layers(model):
        for key in ("mask", "ever_active"):
            mine = state[f"{layer.name}.{key}"].to(torch.uint8)
            gathered = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(g, mine) for g in gathered), f"{layer.name}.{key} differs"
        mask = layer.mask
        assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
        assert bool((state[f"{layer.name}.ever_active"] | ~mask).all()), layer.name
        assert bool((state[f"{layer.name}.weight"][~mask] == 0).all()), layer.name
        assert bool((state[f"{layer.name}.momentum"][~mask] == 0).all()), layer.name


def dcp_state(model, optimizer, scheduler) -> dict:
    """What a DCP checkpoint holds: model, optimizer and scheduler (README's layout)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {
        "model": model_state,
        "optim": optim_state,
        "sparse": sp.checkpoint.SchedulerState(scheduler),
    }


def _run(algorithm: str, rank: int, ckpt_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, optimizer, scheduler = build(algorithm, shard=True)
    counts, initial = helpers.counts(model), helpers.masks(model)
    for step in range(STEPS):
        train(model, optimizer, [step], rank)
        check_ranks_agree_and_invariants(model, optimizer)
        if algorithm in ("static", "set", "rigl", "srigl"):  # per-layer counts fixed
            assert helpers.counts(model) == counts
        elif algorithm in ("snfs", "dsr"):  # the total fixed
            assert sum(helpers.counts(model).values()) == sum(counts.values())
        if step + 1 == SAVE_AT:
            dcp.save(dcp_state(model, optimizer, scheduler), checkpoint_id=ckpt_dir)
    result = {"final": full_state(model, optimizer), "updates": len(scheduler.history)}
    result["moved"] = any(
        not torch.equal(mask, initial[name]) for name, mask in helpers.masks(model).items()
    )

    model, optimizer, scheduler = build(algorithm, shard=True)
    state = dcp_state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    assert scheduler.step_count == SAVE_AT  # loaded by dcp.load through SchedulerState
    train(model, optimizer, range(SAVE_AT, STEPS), rank)
    result["resumed"] = full_state(model, optimizer)
    return result


def _run_compiled(algorithm: str, rank: int) -> dict:
    """The run of :func:`_run` (no checkpoint) through ``torch.compile(model)``: dynamo
    and AOT autograd (``aot_eager``) around the sharded model."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model, optimizer, scheduler = build(algorithm, shard=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for step in range(STEPS):
        train(compiled, optimizer, [step], rank)
        check_ranks_agree_and_invariants(model, optimizer)
    return {"final": full_state(model, optimizer), "updates": len(scheduler.history)}


def _graph_breaks(rank: int) -> dict[str, dict]:
    """How often and in which files dynamo breaks the graph of the sharded RigL model, on a steady
    step and on a dense-gradient capture step (``torch._dynamo.explain``)."""
    torch._dynamo.reset()
    model, _, _ = build("rigl", shard=True)
    x, _ = helpers.batch(0, 8)
    out = {}
    for kind in ("steady", "capture"):
        helpers.set_capture(model, kind == "capture")
        explained = torch._dynamo.explain(model)(x[4 * rank : 4 * rank + 4])
        files = [r.user_stack[-1].filename for r in explained.break_reasons]
        out[kind] = {"count": explained.graph_break_count, "files": files}
    return out


def _captured_twice_and_afresh(rank: int) -> dict[str, torch.Tensor]:
    """RigL's dense gradient of fc1 on a sharded model (a DTensor shard until the update,
    gathered here) after one backward pass, after a second one on the same batch
    without ``zero_grad()`` (accumulated: twice as much), after ``zero_grad()`` and one
    more (afresh: as after one), and after ``zero_grad()``, one without gradient sync
    and one with it (FSDP2 accumulates unsharded and reduce-scatters once: twice as
    much); and the sharded ``.grad`` each time (masked)."""
    model, optimizer, scheduler = build("rigl", shard=True)
    x, y = helpers.batch(0, 8)
    data = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
    helpers.set_capture(model, True)
    fc1 = model.fc1.parametrizations.weight
    out = {}
    for key in ("once", "twice", "afresh", "no sync", "synced"):
        if key in ("afresh", "no sync"):
            optimizer.zero_grad()
        model.fc1.set_requires_gradient_sync(key != "no sync")
        helpers.loss_of(model, data).backward()
        if key == "no sync":
            continue  # nothing reduced yet
        out[key] = fc1[0].dense_grad.full_tensor()
        out[f"{key} grad"] = fc1.original.grad.full_tensor()
    out["mask"] = fc1[0].mask.clone()
    scheduler.remove()
    return out


def _refused_after_fully_shard() -> str:
    from torch.distributed.fsdp import fully_shard

    model = helpers.TinyNet()
    fully_shard(model)
    try:
        sp.sparsify(model, 0.3)
    except ValueError as error:
        assert next(sp.sparse_layers(model), None) is None
        return str(error)
    raise AssertionError("sparsify accepted sharded weights")


def _meta_shard_materialize() -> dict[str, torch.Tensor]:
    """Meta-device TinyNet: sparsify, fully_shard, to_empty, materialize; its masks."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = helpers.TinyNet()
    sp.sparsify(model, 0.3)
    for module in (model.fc1, model.fc2, model):
        fully_shard(module)
    model.to_empty(device="cpu")
    sp.materialize(model)
    for layer in sp.sparse_layers(model):
        assert bool((layer.weight.full_tensor()[~layer.mask] == 0).all()), layer.name
    return helpers.masks(model)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with helpers.gloo_group(rank, world_size, port):
        results = {a: _run(a, rank, f"{out_dir}/dcp-{a}") for a in ALGORITHMS}
        results["compiled"] = {a: _run_compiled(a, rank) for a in ALGORITHMS}
        results["capture"] = _captured_twice_and_afresh(rank)
        results["breaks"] = _graph_breaks(rank)
        results["refused"] = _refused_after_fully_shard()
        results["meta"] = _meta_shard_materialize()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    args = (WORLD_SIZE, helpers.free_port(), str(out_dir))
    ranks = helpers.run_ranks(_worker, args, WORLD_SIZE, out_dir, "FSDP")
    return out_dir, ranks


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fsdp_run_equals_single_process_run(fsdp_run, algorithm):
    _, ranks = fsdp_run
    with helpers.torch_threads(1):
        model, optimizer, scheduler = build(algorithm, shard=False)
        train(model, optimizer, range(STEPS))
    assert ranks[0][algorithm]["updates"] == len(scheduler.history)
    if algorithm != "static":  # else the comparison would not test any update
        assert len(scheduler.history) == 2 and ranks[0][algorithm]["moved"], algorithm
    for layer in sp.sparse_layers(model):
        for rank in ranks:
            final = rank[algorithm]["final"]
            assert torch.equal(final[f"{layer.name}.mask"], layer.mask), layer.name
            assert torch.equal(final[f"{layer.name}.ever_active"], layer.ever_active)
            momentum = optimizer.state[layer.weight]["momentum_buffer"]
            torch.testing.assert_close(final[f"{layer.name}.weight"], layer.weight.detach())
            torch.testing.assert_close(final[f"{layer.name}.momentum"], momentum)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_compiled_fsdp_run_equals_the_eager_fsdp_run(fsdp_run, algorithm):
    """torch.compile around the sharded model: the same updates and masks as eager, the
    weights within float tolerance (AOT autograd may reorder the backward's sums); the
    invariants held on every rank after every step (checked in the worker)."""
    _, ranks = fsdp_run
    for rank in ranks:
        eager, compiled = rank[algorithm], rank["compiled"][algorithm]
        assert compiled["updates"] == eager["updates"]
        for key, value in eager["final"].items():
            if key.endswith(("mask", "ever_active")):
                assert torch.equal(compiled["final"][key], value), key
            else:
                torch.testing.assert_close(compiled["final"][key], value)


def test_compiled_fsdp_breaks_graphs_only_in_fsdp_hooks(fsdp_run):
    """FSDP2 runs its hooks outside compiled code (``torch._dynamo.disable``): one break
    at the pre- and one at the post-forward hook of each sharded block (fc1, fc2; the
    root's run outside the graph), the same on capture steps; none inside the library."""
    _, ranks = fsdp_run
    for rank in ranks:
        for kind, breaks in rank["breaks"].items():
            assert breaks["count"] == 4, (kind, breaks)
            assert all("torch/distributed/fsdp" in f for f in breaks["files"]), (kind, breaks)


def test_sharded_capture_accumulates_as_grad_does_and_the_grad_is_masked(fsdp_run):
    _, ranks = fsdp_run
    once = ranks[0]["capture"]["once"]
    for rank in ranks:
        capture = rank["capture"]
        assert capture["once"].abs().sum() > 0
        torch.testing.assert_close(capture["once"], once)  # averaged over the ranks
        torch.testing.assert_close(capture["twice"], 2 * once)
        torch.testing.assert_close(capture["afresh"], once)
        torch.testing.assert_close(capture["synced"], 2 * once)
        for key in ("once", "twice", "afresh", "synced"):  # what the optimizer sees
            grad, mask = capture[f"{key} grad"], capture["mask"]
            assert bool((grad[~mask] == 0).all()), key
            torch.testing.assert_close(grad[mask], capture[key][mask])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dcp_resume_is_exact(fsdp_run, algorithm):
    _, ranks = fsdp_run
    for rank in ranks:
        final, resumed = rank[algorithm]["final"], rank[algorithm]["resumed"]
        assert list(final) == list(resumed)
        for key, value in final.items():
            assert torch.equal(resumed[key], value), key


def test_sharded_checkpoint_converts_to_a_plain_one(fsdp_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out_dir, _ = fsdp_run
    dcp_to_torch_save(out_dir / "dcp-rigl", tmp_path / "plain.pt")
    state = torch.load(tmp_path / "plain.pt", weights_only=True)
    with helpers.torch_threads(1):
        model, optimizer, scheduler = build("rigl", shard=False)
        train(model, optimizer, range(SAVE_AT))
    sp.load_state_dict(model, state["model"])  # the checked, all-or-nothing loader
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6)
    scheduler.load_state_dict(sp.checkpoint.load_scheduler_state(state["sparse"]))
    assert scheduler.step_count == SAVE_AT


def test_sparsify_after_fully_shard_is_refused_with_the_fix(fsdp_run):
    _, ranks = fsdp_run
    for rank in ranks:
        assert "call sparsify(model) before fully_shard(...)" in rank["refused"]


def test_meta_model_sharded_then_materialized_gets_the_eager_masks(fsdp_run):
    _, ranks = fsdp_run
    eager = helpers.masks(helpers.build_model())
    for rank in ranks:
        for name, mask in eager.items():
            assert torch.equal(rank["meta"][name], mask), name
