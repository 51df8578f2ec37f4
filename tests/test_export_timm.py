"""Sparse checkpoints into timm's validate.py and create_model, and TorchScript.

``python -m sparse_param.export CKPT OUT [--ema]`` converts a checkpoint written by timm's
``CheckpointSaver`` (Task API) into plain weights; ``timm.models.load_checkpoint`` (what
validate.py's ``--checkpoint`` calls) and ``create_model(pretrained=True,
pretrained_cfg_overlay=dict(file=OUT))`` then load them into a fresh model whose outputs
equal the sparse model's. ``torch.jit.script`` of a sparse model is refused with the fix.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch
from helpers import HANG_GUARD_S
from timm import utils
from torch import nn

import sparse_param as sp
from sparse_param.export import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")
task_api = pytest.importorskip("timm.task", reason="timm < 1.0.28 has no Task API")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def create(**kwargs) -> nn.Module:
    return timm.create_model("resnet18", num_classes=10, **kwargs).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sparse resnet18 and its EMA after 3 SGD steps, saved by CheckpointSaver(task=...)."""
    out = tmp_path_factory.mktemp("saver")
    torch.manual_seed(0)
    model = sp.sparsify(create(), density=0.1)
    task = task_api.ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task.setup_ema(decay=0.5)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        task(X, torch.tensor([step, 9 - step]))["loss"].backward()
        optimizer.step()
        task.update_ema(step=step + 1)
    saver = utils.CheckpointSaver(
        model=model, optimizer=optimizer, checkpoint_dir=str(out), recovery_dir=str(out), task=task
    )
    saver.save_checkpoint(epoch=0, metric=0.0)
    ema = task.get_trainable_module(ema=True).module
    with torch.no_grad():
        outputs = {"model": model.eval()(X), "ema": ema.eval()(X)}
    assert not torch.equal(outputs["model"], outputs["ema"])  # the --ema choice is visible
    return out / "last.pth.tar", outputs


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_exported_weights_load_like_validate_py_and_match_the_sparse_model(
    trained, tmp_path, suffix, ema
):
    checkpoint, outputs = trained
    out = tmp_path / f"plain{suffix}"
    main([str(checkpoint), str(out)] + (["--ema"] if ema else []))

    fresh = create()
    timm.models.load_checkpoint(fresh, str(out))  # validate.py --checkpoint OUT (strict)
    pretrained = create(pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=10))
    with torch.no_grad():
        for model in (fresh, pretrained):
            assert not any(sp.sparse_layers(model))
            assert torch.equal(model(X), outputs["ema" if ema else "model"])


def test_export_command_runs_as_a_module(trained, tmp_path):
    checkpoint, _ = trained
    out = tmp_path / "plain.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "sparse_param.export", str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    )
    assert f"wrote {out}" in done.stdout
    assert "RuntimeWarning" not in done.stderr
    assert out.stat().st_size > 1_000_000


def test_export_accepts_a_bare_sparse_state_dict(trained, tmp_path):
    checkpoint, outputs = trained
    state_dict = torch.load(checkpoint, weights_only=False)["state_dict"]
    torch.save(state_dict, tmp_path / "sd.pth")
    main([str(tmp_path / "sd.pth"), str(tmp_path / "plain.pth")])
    fresh = create()
    timm.models.load_checkpoint(fresh, str(tmp_path / "plain.pth"))
    with torch.no_grad():
        assert torch.equal(fresh(X), outputs["model"])


def test_export_refuses_what_it_cannot_convert(trained, tmp_path, capsys):
    checkpoint, _ = trained
    dense = tmp_path / "dense.pth"
    torch.save(create().state_dict(), dense)
    no_ema = tmp_path / "no_ema.pth.tar"
    torch.save({"state_dict": torch.load(checkpoint, weights_only=False)["state_dict"]}, no_ema)
    cases = [
        ([str(dense), str(tmp_path / "a.pth")], "no sparse layers"),
        ([str(no_ema), str(tmp_path / "b.pth"), "--ema"], "no 'state_dict_ema'"),
        ([str(checkpoint), str(tmp_path / "c.txt")], "name the file .safetensors"),
        ([str(tmp_path / "missing.pth"), str(tmp_path / "d.pth")], "No such file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pth", "no_ema.pth.tar"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_refuses_a_sparse_model_and_scripts_a_finalized_copy():
    torch.manual_seed(0)
    model = sp.sparsify(create(), density=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"finalize\(copy.deepcopy\(model\)\)"):
        torch.jit.script(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(list(sp.sparse_layers(model))) == 21

    scripted = torch.jit.script(sp.finalize(copy.deepcopy(model)).eval())
    with torch.no_grad():
        assert torch.equal(scripted(X), model(X))
