"""timm's upstream train.py sequence (Task API) with sparse_param added as the README
says: create_model → sparsify → ClassificationTask → optimizer → RigL → resume_task_checkpoint
→ task.setup_ema → CheckpointSaver(task=...) → create_scheduler_v2 → total_steps → AMP
steps, then a resume in a new process (see tests/timm_sequence.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD_S

import sparse_param as sp

pytest.importorskip("timm.task", reason="timm < 1.0.28 has no Task API")

SCRIPT = Path(__file__).with_name("timm_sequence.py")


def _phase(name: str, out: Path, *options: str, runs=("upstream", "reseeded")) -> dict:
    command = [sys.executable, str(SCRIPT), name, str(out), *options]
    subprocess.run(command, check=True, timeout=3 * HANG_GUARD_S)
    return {run: torch.load(out / run / f"{name}.pt", weights_only=True) for run in runs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("timm_sequence")
    return {
        "full": _phase("full", root / "full"),
        "first": _phase("first", root / "split"),
        "resume": _phase("resume", root / "split"),
    }


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """train.py --torchcompile aot_eager, every algorithm, on timm's test_resnet."""
    root = tmp_path_factory.mktemp("timm_sequence_compiled")
    options = ("--compile", "aot_eager")
    return {
        phase: _phase(phase, root / out, *options, runs=tuple(sp.ALGORITHMS))
        for phase, out in (("full", "full"), ("first", "split"), ("resume", "split"))
    }


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_torchcompile_sequence_resumes_exactly_with_a_sparse_ema(compiled_runs, algorithm):
    """timm's train.py order with --torchcompile (task.compile, task.compile_ema after
    the EMA): training, the checkpoint and the resume work for every algorithm; the
    resumed run ends bit-identical to the uninterrupted one, and the compiled EMA keeps
    the live masks and exact zeros where they are off."""
    full, first, resumed = (compiled_runs[p][algorithm] for p in ("full", "first", "resume"))
    assert resumed["step_count"] == full["step_count"] == 12
    assert resumed["updates"] == full["updates"]
    for key in ("masks", "ever_active", "weights"):
        for name, value in full[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    for run in (full, resumed):
        for name, mask in run["masks"].items():
            assert torch.equal(run["ema_masks"][name], mask), name
        assert run["ema_inactive_nonzero"] == 0
    if algorithm != "static":
        assert full["updates"] > 0


@pytest.mark.slow
def test_resume_with_the_reseed_fix_continues_exactly(runs):
    full, first, resumed = (runs[p]["reseeded"] for p in ("full", "first", "resume"))
    assert first["updates"] == 3 and full["updates"] == 4  # at steps 2, 4, 6 | 8
    assert resumed["step_count"] == full["step_count"] == 12
    assert resumed["updates"] == 4  # history came back through optimizer.state_dict()
    for name, mask in full["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
        assert torch.equal(resumed["ever_active"][name], full["ever_active"][name]), name
        assert torch.equal(resumed["weights"][name], full["weights"][name]), name
    assert any(not torch.equal(first["masks"][n], full["masks"][n]) for n in full["masks"]), (
        "RigL changed no mask after the checkpoint: the resume check would be vacuous"
    )


@pytest.mark.slow
def test_upstream_resume_differs_because_the_global_rng_restarts(runs):
    """The README's caveat: train.py seeds the global RNG once and never saves it, so the
    resumed run draws other dropout masks than the uninterrupted one."""
    full, resumed = runs["full"]["upstream"], runs["resume"]["upstream"]
    assert resumed["step_count"] == full["step_count"] == 12
    assert any(not torch.equal(resumed["weights"][n], w) for n, w in full["weights"].items())


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["full", "resume"])
@pytest.mark.parametrize("variant", ["upstream", "reseeded"])
def test_ema_tracks_live_masks_and_stays_sparse(runs, phase, variant):
    run = runs[phase][variant]
    for name, mask in run["masks"].items():
        assert torch.equal(run["ema_masks"][name], mask), name
    assert run["ema_inactive_nonzero"] == 0


def test_head_init_scale_after_sparsify_is_not_a_no_op():
    import timm

    import sparse_param as sp

    torch.manual_seed(0)
    model = sp.sparsify(timm.create_model("resnet18", num_classes=10), density=0.1)
    head = model.get_classifier()
    before = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.mul_(0.5)
    assert torch.equal(head.weight.detach(), before * 0.5)
    model.eval()
    with torch.no_grad():
        head.weight.mul_(2.0)
    assert torch.equal(head.weight.detach(), before)
