"""The sequence timm's upstream train.py runs (Task API, timm >= 1.0.28), with
sparse_param's lines where the README puts them.

Run as a script by tests/test_timm_sequence.py, one process per phase:
    python timm_sequence.py full   OUT   # EPOCHS epochs uninterrupted
    python timm_sequence.py first  OUT   # EPOCHS // 2 epochs, CheckpointSaver after each
    python timm_sequence.py resume OUT   # fresh process: resume_task_checkpoint, the rest
    python timm_sequence.py PHASE OUT --compile aot_eager   # train.py --torchcompile
Each phase runs two variants of the epoch loop and writes OUT/<variant>/<phase>.pt with
the masks, weights and EMA masks it ended with:
    "upstream": train.py as it is; the global RNG is seeded once, at start-up.
    "reseeded": the README's fix; ``utils.random_seed(seed + epoch * world_size, rank)``
        at the start of every epoch, so a resumed run draws the same dropout masks.
The model has dropout, so the variants differ exactly where the global RNG matters.

With ``--compile BACKEND`` the sequence includes train.py's ``--torchcompile`` lines
(``task.compile`` and ``task.compile_ema`` after the EMA, before DDP) and runs the
"reseeded" variant of every algorithm in ``--algorithms`` on timm's small
``test_resnet``, writing OUT/<algorithm>/<phase>.pt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch._dynamo
from timm import utils
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from torch import nn

import sparse_param as sp

SEED = 42
EPOCHS = 4
UPDATES_PER_EPOCH = 3  # RigL updates every 2 steps: at steps 2, 4, 6 | 8 (T_end = 9)
VARIANTS = ("upstream", "reseeded")
args = argparse.Namespace(model="test_resnet", seed=SEED, world_size=1)  # saved by CheckpointSaver


PRUNING = {"gmp", "granet"}  # prune from sparsify's density to the scheduler's


def build(mask_seed: int, algorithm: str = "rigl", model_name: str = "test_resnet"):
    """train.py from create_model to the EMA, in its order, with the README's lines."""
    model = timm.create_model(model_name, num_classes=10, drop_rate=0.25)
    with torch.no_grad():  # --head-init-scale
        model.get_classifier().weight.mul_(0.5)
    structure = {"structure": "fan_in"} if algorithm == "srigl" else {}
    density = 0.2 if algorithm in PRUNING else 0.1
    sp.sparsify(model, density=density, seed=mask_seed, **structure)  # 1. after create_model
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), verbose=False)
    model = task.get_trainable_module()
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    # 2. before the resume; total_steps=1 is the placeholder until create_scheduler_v2
    kw = {} if algorithm == "static" else {"update_interval": 2}
    if algorithm in PRUNING:
        kw["density"] = 0.1
    scheduler = sp.ALGORITHMS[algorithm](model, optimizer, total_steps=1, **kw)
    loss_scaler = utils.NativeScaler(device="cpu")
    return task, model, optimizer, scheduler, loss_scaler


def train_one_epoch(epoch: int, task, model, optimizer, loss_scaler) -> None:
    """train_one_epoch's update path: task forward, scaler step, zero_grad, EMA update."""
    model.train()
    optimizer.zero_grad()
    for i in range(UPDATES_PER_EPOCH):
        num_updates = epoch * UPDATES_PER_EPOCH + i
        data = torch.Generator().manual_seed(num_updates)
        x = torch.randn(4, 3, 32, 32, generator=data)
        y = torch.randint(0, 10, (4,), generator=data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task(x, y)["loss"]
        loss_scaler(loss, optimizer)
        optimizer.zero_grad()
        task.update_ema(step=num_updates + 1)


def run(
    phase: str,
    variant: str,
    out: Path,
    algorithm: str = "rigl",
    model_name: str = "test_resnet",
    backend: str | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "last.pth.tar"
    utils.random_seed(SEED, 0)  # train.py's start-up
    # A resumed run starts from other masks: they must come back from the checkpoint.
    mask_seed = 1 if phase == "resume" else 0
    task, model, optimizer, scheduler, loss_scaler = build(mask_seed, algorithm, model_name)
    resume_epoch = None
    if phase == "resume":
        resume_epoch = resume_task_checkpoint(
            task, str(checkpoint), optimizer=optimizer, loss_scaler=loss_scaler, log_info=False
        )
    task.setup_ema(decay=0.9)
    if phase == "resume":
        load_task_ema_checkpoint(task, str(checkpoint))
    if backend is not None:  # --torchcompile
        task.compile(backend=backend)
        model = task.get_trainable_module()
        task.compile_ema(backend=backend)
    saver = utils.CheckpointSaver(
        model=model,
        optimizer=optimizer,
        args=args,
        amp_scaler=loss_scaler,
        checkpoint_dir=str(out),
        recovery_dir=str(out),
        task=task,
    )
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, "cosine", num_epochs=EPOCHS, updates_per_epoch=UPDATES_PER_EPOCH
    )
    scheduler.total_steps = num_epochs * UPDATES_PER_EPOCH  # 3. after create_scheduler_v2
    start_epoch = resume_epoch or 0
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)
    end_epoch = num_epochs // 2 if phase == "first" else num_epochs
    for epoch in range(start_epoch, end_epoch):
        if variant == "reseeded":
            utils.random_seed(args.seed + epoch * args.world_size, 0)
        train_one_epoch(epoch, task, model, optimizer, loss_scaler)
        saver.save_checkpoint(epoch, metric=0.0)
        lr_scheduler.step(epoch + 1)
    torch.save(
        snapshot(model, task.get_trainable_module(ema=True).module, scheduler), out / f"{phase}.pt"
    )


def snapshot(model: nn.Module, ema: nn.Module, scheduler: sp.SparseScheduler) -> dict:
    live = {layer.name: layer for layer in sp.sparse_layers(model)}
    averaged = {layer.name: layer for layer in sp.sparse_layers(ema)}
    return {
        "masks": {n: layer.mask.clone() for n, layer in live.items()},
        "ever_active": {n: layer.ever_active.clone() for n, layer in live.items()},
        "weights": {n: layer.weight.detach().clone() for n, layer in live.items()},
        "ema_masks": {n: layer.mask.clone() for n, layer in averaged.items()},
        "ema_inactive_nonzero": sum(
            int(layer.module.weight[~layer.mask].count_nonzero()) for layer in averaged.values()
        ),
        "step_count": scheduler.step_count,
        "updates": len(scheduler.history),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="timm train.py's sequence with sparse_param")
    parser.add_argument("phase", choices=("full", "first", "resume"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--compile", metavar="BACKEND", default=None)
    parser.add_argument("--algorithms", default=",".join(sp.ALGORITHMS))
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    if options.compile is None:
        for variant in VARIANTS:
            run(options.phase, variant, options.out / variant)
        return
    for algorithm in options.algorithms.split(","):
        torch._dynamo.reset()
        out = options.out / algorithm
        run(options.phase, "reseeded", out, algorithm, "test_resnet", options.compile)


if __name__ == "__main__":
    main(sys.argv[1:])
