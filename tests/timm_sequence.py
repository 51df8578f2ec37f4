"""The sequence timm's train.py runs, with sparse_param's lines added (see README).

Run as a script by tests/test_timm_sequence.py, one process per phase:
    python timm_sequence.py full   OUT   # 2 × STEPS steps uninterrupted
    python timm_sequence.py first  OUT   # STEPS steps, then CheckpointSaver
    python timm_sequence.py resume OUT   # fresh process: resume_checkpoint, STEPS more
Each phase writes OUT/<phase>.pt with the masks, weights and EMA masks it ended with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler

import sparse_param as sp

STEPS = 4  # per phase; RigL updates every 2 steps, so each phase crosses two updates


def build(seed: int):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    with torch.no_grad():  # train.py's --head-init-scale, here after sparsify
        sp.sparsify(model, density=0.1, seed=seed)
        model.get_classifier().weight.mul_(0.5)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    rigl = sp.RigL(model, optimizer, total_steps=4 * STEPS, update_interval=2)
    ema = ModelEmaV3(model, decay=0.9)
    scaler = NativeScaler(device="cpu")
    return model, optimizer, rigl, ema, scaler


def train(model, optimizer, ema, scaler, first_step: int, steps: int) -> None:
    model.train()
    for step in range(first_step, first_step + steps):
        data = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 32, 32, generator=data)
        y = torch.randint(0, 10, (4,), generator=data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        scaler(loss, optimizer)
        ema.update(model, step=step)


def snapshot(model, ema, rigl) -> dict:
    live = {layer.name: layer for layer in sp.sparse_layers(model)}
    averaged = {layer.name: layer for layer in sp.sparse_layers(ema.module)}
    return {
        "masks": {n: layer.mask.clone() for n, layer in live.items()},
        "ever_active": {n: layer.ever_active.clone() for n, layer in live.items()},
        "weights": {n: layer.weight.detach().clone() for n, layer in live.items()},
        "ema_masks": {n: layer.mask.clone() for n, layer in averaged.items()},
        "ema_inactive_nonzero": sum(
            int(layer.module.weight[~layer.mask].count_nonzero()) for layer in averaged.values()
        ),
        "step_count": rigl.step_count,
        "updates": len(rigl.history),
    }


def main(phase: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if phase == "full":
        model, optimizer, rigl, ema, scaler = build(seed=0)
        train(model, optimizer, ema, scaler, 0, 2 * STEPS)
    elif phase == "first":
        model, optimizer, rigl, ema, scaler = build(seed=0)
        train(model, optimizer, ema, scaler, 0, STEPS)
        saver = CheckpointSaver(
            model, optimizer, model_ema=ema, amp_scaler=scaler, checkpoint_dir=str(out),
            recovery_dir=str(out),
        )
        saver.save_checkpoint(epoch=0, metric=0.0)
    elif phase == "resume":
        model, optimizer, rigl, ema, scaler = build(seed=1)  # other masks: must be restored
        timm.models.resume_checkpoint(model, str(out / "last.pth.tar"), optimizer, scaler)
        checkpoint = torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)
        ema.module.load_state_dict(checkpoint["state_dict_ema"])
        train(model, optimizer, ema, scaler, STEPS, STEPS)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    torch.save(snapshot(model, ema, rigl), out / f"{phase}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
