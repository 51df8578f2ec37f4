"""timm's train.py sequence with sparse_param added: create_model → sparsify → optimizer →
RigL attached → ModelEmaV3 → AMP steps → CheckpointSaver → resume in a new process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("timm_sequence.py")


def _phase(name: str, out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), name, str(out)], check=True, timeout=600)
    return torch.load(out / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("timm_sequence")
    return {
        "full": _phase("full", root / "full"),
        "first": _phase("first", root / "split"),
        "resume": _phase("resume", root / "split"),
    }


@pytest.mark.slow
def test_resume_in_new_process_continues_exactly(runs):
    full, first, resumed = runs["full"], runs["first"], runs["resume"]
    assert first["updates"] == 2 and full["updates"] == 4
    assert resumed["step_count"] == full["step_count"] == 8
    assert resumed["updates"] == 4  # history came back through optimizer.state_dict()
    for name, mask in full["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
        assert torch.equal(resumed["ever_active"][name], full["ever_active"][name]), name
        assert torch.equal(resumed["weights"][name], full["weights"][name]), name
    assert any(
        not torch.equal(first["masks"][n], full["masks"][n]) for n in full["masks"]
    ), "RigL changed no mask after the checkpoint: the resume check would be vacuous"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["full", "resume"])
def test_ema_tracks_live_masks_and_stays_sparse(runs, phase):
    run = runs[phase]
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
