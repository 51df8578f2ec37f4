#!/usr/bin/env python3
"""Sparse-from-scratch training of timm models.

A lean training script on timm's public pieces (``create_model``, ``create_optimizer_v2``,
``create_scheduler_v2``, ``create_dataset`` / ``create_loader``, ``Mixup``,
``ModelEmaV3``, ``CheckpointSaver``, ``NativeScaler``, ``distribute_bn``) with timm
train.py's familiar flags, plus sparse training from ``sparse_param``::

    python recipes/train.py --data-dir DATA --model resnet18 --num-classes 10 \\
        --sparse-method rigl --density 0.1 --update-interval 100
    python recipes/train.py --data-dir DATA --config recipes/lenet300_100_mnist_98.yaml
    torchrun --nproc_per_node 2 recipes/train.py --data-dir DATA ...

Order of setup (as timm's train.py): create_model → sparsify → optimizer → LR scheduler
→ sparse scheduler (attached to the optimizer; total_steps = epochs × updates per epoch)
→ resume (model, optimizer, LR scheduler, sparse scheduler, AMP scaler, EMA) →
ModelEmaV3 → torch.compile → DistributedDataParallel.

Outputs in ``--output/--experiment``: ``args.yaml``, ``summary.csv`` (timm's columns
epoch, train_*, eval_*, lr, plus ``density``, ``itop_rate`` = R_s, ``egf`` = effective
gradient flow of the epoch's last batch and ``train_flops`` = training FLOPs so far), checkpoints
(``last.pth.tar``, ``checkpoint-N.pth.tar``, ``model_best.pth.tar``, with the sparse
scheduler state under ``"sparse_scheduler"``), ``sparse_history.json`` (every topology
update), ``training_curves.png`` and ``layer_density.png``, TensorBoard logs with
``--log-tensorboard``.

Resume: ``--resume path/to/checkpoint.pth.tar`` restores everything above. The global
RNGs are re-seeded from ``--seed`` and the epoch at the start of every epoch, so on CPU
with ``--workers 0`` a run resumed from ``checkpoint-N`` reproduces the uninterrupted run
bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from timm.data import (
    FastCollateMixup,
    Mixup,
    create_dataset,
    create_loader,
    resolve_data_config,
)
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    AverageMeter,
    CheckpointSaver,
    ModelEmaV3,
    NativeScaler,
    accuracy,
    distribute_bn,
)
from torch import nn

try:
    import sparse_param
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparse_param
import sparse_param.models  # noqa: F401  (registers the papers' models with timm)
from sparse_param import plots
from sparse_param.algorithms import PRUNING_METHODS  # start dense, prune to --density
from sparse_param.arguments import check_int, check_real
from sparse_param.checkpoint import load_checkpoint_file
from sparse_param.layers import unwrap
from sparse_param.scheduler import OPTIMIZER_STATE_KEY
from sparse_param.structure import parse_structure

_logger = logging.getLogger("train")

SPARSE_METHODS = ("dense", *sparse_param.ALGORITHMS)
SPARSE_CHECKPOINT_KEY = "sparse_scheduler"
LR_SCHEDULER_CHECKPOINT_KEY = "lr_scheduler"
_TRAIN_SPLITS = ("train", "training")
_EVAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")


# ------------------------------------------------------------------------ arguments


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=foo``: a dict of literal values."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string}: expected key=value, got {item!r}")
            kwargs[key] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sparse-from-scratch training of timm models (sparse_param)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        default="",
        metavar="FILE",
        help="YAML file of defaults; keys are flag names with underscores",
    )
    parser.add_argument(
        "data",
        nargs="?",
        metavar="DIR",
        default=None,
        help="path to the dataset (positional alternative to --data-dir)",
    )

    g = parser.add_argument_group("Dataset")
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="dataset root holding one folder per split, each an ImageFolder",
    )
    g.add_argument(
        "--dataset",
        "-d",
        metavar="NAME",
        default="",
        help="'' or 'folder'/'imagefolder': a local ImageFolder. Registry datasets "
        "(torch/, tfds/, hfds/, wds/) need downloads and are not supported",
    )
    g.add_argument("--train-split", default="train", metavar="NAME")
    g.add_argument(
        "--val-split",
        default="validation",
        metavar="NAME",
        help="validation folder; val/valid/eval are also looked for",
    )
    g.add_argument("--class-map", default="", metavar="FILENAME")

    g = parser.add_argument_group("Model")
    g.add_argument(
        "--model",
        default="resnet50",
        metavar="MODEL",
        help="any timm model, or one of sparse_param.models (lenet_300_100, "
        "mlp_cifar, set_mlp_cifar, wrn_28_2, cifar_resnet34, cifar_vgg16)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        default=False,
        help="start from timm's pretrained weights (needs them cached: no internet)",
    )
    g.add_argument("--num-classes", type=int, default=None, metavar="N")
    g.add_argument(
        "--in-chans",
        type=int,
        default=None,
        metavar="N",
        help="image channels (model default if unset); 1 reads images as grayscale",
    )
    g.add_argument("--img-size", type=int, default=None, metavar="N")
    g.add_argument(
        "--input-size",
        default=None,
        nargs=3,
        type=int,
        metavar="N",
        help="C H W, overrides --img-size and --in-chans",
    )
    g.add_argument("--crop-pct", default=None, type=float, metavar="PCT")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD")
    g.add_argument("--interpolation", default="", metavar="NAME")
    g.add_argument("-b", "--batch-size", type=int, default=128, metavar="N")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N")
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        help="extra model arguments, key=value",
    )

    g = parser.add_argument_group("Optimizer")
    g.add_argument(
        "--opt",
        default="sgd",
        metavar="OPTIMIZER",
        help="any timm optimizer (sgd = SGD with Nesterov momentum, momentum = "
        "plain momentum SGD, adamw, lamb, …)",
    )
    g.add_argument("--opt-eps", default=None, type=float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))

    g = parser.add_argument_group("Learning rate schedule")
    g.add_argument(
        "--sched",
        default="cosine",
        metavar="SCHEDULER",
        help="timm scheduler: cosine, step, multistep, plateau, poly, tanh, …",
    )
    g.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=False,
        help="step the LR schedule every update instead of every epoch",
    )
    g.add_argument("--lr", type=float, default=0.05, metavar="LR")
    g.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR")
    g.add_argument("--min-lr", type=float, default=0.0, metavar="LR")
    g.add_argument("--epochs", type=int, default=300, metavar="N")
    g.add_argument("--start-epoch", default=None, type=int, metavar="N")
    g.add_argument(
        "--decay-milestones",
        default=[90, 180, 270],
        type=int,
        nargs="+",
        metavar="EPOCH",
        help="epochs of the LR drops for --sched multistep",
    )
    g.add_argument(
        "--decay-epochs",
        type=float,
        default=90,
        metavar="N",
        help="epochs between LR drops for --sched step",
    )
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0, metavar="N")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N")

    g = parser.add_argument_group("Augmentation and regularization")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT")
    g.add_argument("--ratio", type=float, nargs="+", default=[3 / 4, 4 / 3], metavar="RATIO")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT")
    g.add_argument(
        "--aa", default=None, metavar="NAME", help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1"
    )
    g.add_argument("--reprob", type=float, default=0.0, metavar="PCT")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--mixup-off-epoch", default=0, type=int, metavar="N")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument(
        "--drop",
        type=float,
        default=0.0,
        metavar="PCT",
        help="dropout rate (the model's drop_rate)",
    )
    g.add_argument("--drop-path", type=float, default=None, metavar="PCT")

    g = parser.add_argument_group("Batch norm")
    g.add_argument("--sync-bn", action="store_true", default=False)
    g.add_argument(
        "--dist-bn",
        default="reduce",
        choices=("reduce", "broadcast", ""),
        help="share BatchNorm statistics across ranks after every epoch",
    )

    g = parser.add_argument_group("Model EMA")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)

    g = parser.add_argument_group("Sparse training (sparse_param)")
    g.add_argument(
        "--density",
        type=float,
        default=None,
        help="share of active weights over the sparse layers (final density for gmp/granet; "
        "default 0.1, or N/M with an N:M --sparse-structure)",
    )
    g.add_argument("--sparse-method", default="rigl", choices=SPARSE_METHODS)
    g.add_argument(
        "--distribution",
        default="erk",
        choices=("erk", "er", "uniform"),
        help="layer allocation of the density",
    )
    g.add_argument(
        "--update-interval",
        type=int,
        default=None,
        metavar="STEPS",
        help="ΔT, optimizer steps between topology updates (method default)",
    )
    g.add_argument(
        "--drop-fraction",
        type=float,
        default=None,
        help="α / ζ / death rate, share of active weights dropped per update (method default)",
    )
    g.add_argument(
        "--drop-schedule",
        default=None,
        choices=("cosine", "linear", "constant"),
        help="decay of the drop fraction (method default)",
    )
    g.add_argument(
        "--sparse-start",
        type=float,
        default=0.0,
        help="share of training before the first topology update / pruning step",
    )
    g.add_argument(
        "--sparse-stop",
        type=float,
        default=None,
        help="T_end: share of training after which the topology is frozen "
        "(method default, 0.75 for RigL)",
    )
    g.add_argument(
        "--dense-first-last",
        action="store_true",
        default=False,
        help="keep the first and the last sparse-able layer dense",
    )
    g.add_argument(
        "--dense-first",
        action="store_true",
        default=False,
        help="keep the first layer dense (RigL's uniform setting)",
    )
    g.add_argument(
        "--dense-last",
        action="store_true",
        default=False,
        help="keep the last layer (classifier) dense",
    )
    g.add_argument(
        "--sparse-structure",
        default=None,
        metavar="fan_in|N:M",
        help="structured masks: 'fan_in' (every output unit keeps the same number of "
        "inputs) or 'N:M' (N of every M consecutive inputs, e.g. 2:4); srigl defaults to "
        "fan_in; gmp prunes to the structure; snfs, dsr and granet refuse one",
    )
    g.add_argument(
        "--sparse-seed",
        type=int,
        default=0,
        help="seed of the masks and of random regrowth (same on every rank)",
    )
    g.add_argument(
        "--sparse-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rescale each unit's init to its active fan-in (Evci et al.; sparsify's "
        "default); --no-sparse-init keeps the model's own init",
    )
    g.add_argument(
        "--dsr-threshold", type=float, default=1e-3, help="DSR: initial global pruning threshold H"
    )
    g.add_argument(
        "--dsr-target-pruned",
        type=int,
        default=None,
        help="DSR: N_p, weights to prune per update (default 10%% of active)",
    )

    g = parser.add_argument_group("Miscellaneous")
    g.add_argument("--seed", type=int, default=42, metavar="S")
    g.add_argument("--log-interval", type=int, default=50, metavar="N")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N")
    g.add_argument("--eval-metric", default="top1", metavar="EVAL_METRIC")
    g.add_argument("-j", "--workers", type=int, default=4, metavar="N")
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--no-prefetcher", action="store_true", default=False)
    g.add_argument(
        "--amp",
        action="store_true",
        default=False,
        help="mixed precision (float16 with loss scaling on GPU, bfloat16 on CPU)",
    )
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument(
        "--torchcompile",
        nargs="?",
        type=str,
        default=None,
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the model (backend, default inductor)",
    )
    g.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu, … (default: cuda if available, else cpu)"
    )
    g.add_argument(
        "--no-ddp-bb",
        action="store_true",
        default=False,
        help="do not broadcast buffers (BN statistics, masks) in DDP every step",
    )
    g.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help="resume model, optimizer, schedulers, sparse state and EMA",
    )
    g.add_argument("--no-resume-opt", action="store_true", default=False)
    g.add_argument(
        "--output", default="", metavar="PATH", help="output root (default ./output/train)"
    )
    g.add_argument(
        "--experiment",
        default="",
        metavar="NAME",
        help="sub-folder of --output (default: date-model-method-density)",
    )
    g.add_argument("--log-tensorboard", action="store_true", default=False)
    g.add_argument("--no-plots", action="store_true", default=False)
    g.add_argument("--local-rank", "--local_rank", type=int, default=0, dest="local_rank")
    return parser


# The sparse flags each method reads none of: given with it, they would do nothing.
SCHEDULE_FLAGS = (
    "update_interval",
    "drop_fraction",
    "drop_schedule",
    "sparse_start",
    "sparse_stop",
)
DSR_FLAGS = ("dsr_threshold", "dsr_target_pruned")
MASK_FLAGS = ("density", "distribution", "dense_first_last", "dense_first", "dense_last",
              "sparse_seed", "sparse_init")  # fmt: skip
UNREAD = {
    "dense": (MASK_FLAGS + SCHEDULE_FLAGS + DSR_FLAGS, "dense training has no mask"),
    "static": (SCHEDULE_FLAGS + DSR_FLAGS, "static never changes the mask"),
    "dsr": ((), ""),
}


def known_config_keys(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Keys a ``--config`` YAML may hold: every flag's ``dest`` (underscored name)."""
    parser = parser or build_parser()
    return {a.dest for a in parser._actions if a.dest not in ("help", "config")}


def load_config(path: str | os.PathLike, parser: argparse.ArgumentParser | None = None) -> dict:
    """Read a ``--config`` YAML and check every key is a flag of this script."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config must be a mapping of flag names to values")
    unknown = sorted(set(cfg) - known_config_keys(parser))
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {unknown}; keys are flag names with underscores "
            f"(e.g. update_interval for --update-interval)"
        )
    return cfg


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Parse ``argv`` like timm: ``--config`` supplies defaults, the command line wins."""
    parser = build_parser()
    builtin = {a.dest: a.default for a in parser._actions}  # before a --config changes them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_config(known.config, parser))
        except (OSError, ValueError) as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = args.data
    if args.data_dir is None:
        parser.error("give the dataset root with --data-dir (or as the positional DIR)")
    check_unread_flags(parser, args, builtin)
    if args.dense_first_last:
        args.dense_first = args.dense_last = True
    check_structure(parser, args)
    if args.density is None:
        args.density = 0.1
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    check_schedule(parser, args)
    args_text = yaml.safe_dump(vars(args), default_flow_style=False, sort_keys=False)
    return args, args_text


def check_unread_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, builtin: dict[str, Any]
) -> None:
    """Refuse a sparse flag (on the command line or in --config) that --sparse-method
    does not read, rather than train as if it had not been given."""
    method = args.sparse_method
    unread, why = UNREAD.get(method, (DSR_FLAGS, "only dsr reads it"))
    for dest in unread:
        if getattr(args, dest) != builtin[dest]:
            flag = "--" + dest.replace("_", "-")
            parser.error(
                f"{flag} {getattr(args, dest)}: --sparse-method {method} does not use it "
                f"({why}); drop the flag or choose a method that reads it"
            )


def check_schedule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the schedule flags the sparse scheduler would refuse, now rather than
    after the data and the model are built."""
    method = args.sparse_method
    if method in ("dense", "static"):
        return  # check_unread_flags refused any schedule flag
    owner = f"--sparse-method {method}"
    cls = sparse_param.ALGORITHMS[method]
    stop = cls.defaults["stop"] if args.sparse_stop is None else args.sparse_stop
    try:
        if args.update_interval is not None:
            check_int(owner, "--update-interval", args.update_interval, 1)
        if args.drop_fraction is not None:
            check_real(owner, "--drop-fraction", args.drop_fraction, 0, 1)
        check_real(owner, "--sparse-stop", stop, 0, 1)
        check_real(owner, "--sparse-start", args.sparse_start, 0, stop)
        if method == "dsr":
            check_real(owner, "--dsr-threshold", args.dsr_threshold, 0, math.inf,
                       open_low=True, open_high=True)  # fmt: skip
            if args.dsr_target_pruned is not None:
                check_int(owner, "--dsr-target-pruned", args.dsr_target_pruned, 1)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    if method in PRUNING_METHODS and args.density == 1:
        parser.error(
            f"--density 1 with {owner}: it prunes a dense model down to --density, so "
            f"--density must be below 1"
        )


def check_structure(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a ``--sparse-structure`` that is malformed, that the method cannot keep,
    or whose N:M ratio is not ``--density``; default ``--density`` to N/M."""
    if args.sparse_structure is None:
        return
    try:
        structure = parse_structure(args.sparse_structure)
    except (TypeError, ValueError) as e:
        parser.error(f"--sparse-structure: {e}")
    if args.sparse_method in ("dense", "snfs", "dsr", "granet"):
        parser.error(
            f"--sparse-structure {structure}: --sparse-method {args.sparse_method} cannot "
            f"keep a structure (use static, set, rigl, srigl or gmp)"
        )
    if structure.kind == "fan_in":  # any density
        return
    ratio = structure.n / structure.m
    if args.density is None:
        args.density = ratio
    elif abs(args.density - ratio) > 1e-12:
        parser.error(
            f"--density {args.density:g} with --sparse-structure {structure}: N:M fixes the "
            f"density at {ratio:g}; pass --density {ratio:g} or leave it out"
        )


# ----------------------------------------------------------------------- utilities


def seed_everything(seed: int) -> None:
    seed %= 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(args: argparse.Namespace, epoch: int) -> int:
    """Seed of the global RNGs for ``epoch`` on this rank (data order, augmentation,
    dropout, mixup); a resumed run continues with the same seeds."""
    return args.seed + 1_000_003 * (epoch + 1) + 7919 * args.rank


def is_primary(args: argparse.Namespace) -> bool:
    return args.rank == 0


def setup_device(args: argparse.Namespace) -> torch.device:
    """Device, and the process group under torchrun (gloo on CPU, nccl on GPU)."""
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))
    args.distributed = args.world_size > 1
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and args.distributed:
        device = torch.device("cuda", args.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        args.world_size, args.rank = dist.get_world_size(), dist.get_rank()
        _logger.info(
            f"Distributed training ({backend}): rank {args.rank} of {args.world_size}, {device}"
        )
    args.device = str(device)
    return device


def check_dataset(args: argparse.Namespace) -> None:
    name = (args.dataset or "").lower()
    if name not in ("", "folder", "imagefolder", "image_folder"):
        raise SystemExit(
            f"--dataset {args.dataset!r}: only local ImageFolder datasets are supported "
            f"(--dataset '' with --data-dir holding {args.train_split}/ and "
            f"{args.val_split}/ class folders); registry datasets need downloads"
        )
    root = Path(args.data_dir)
    for split, synonyms in ((args.train_split, _TRAIN_SPLITS), (args.val_split, _EVAL_SPLITS)):
        names = [split] + ([s for s in synonyms] if split in synonyms else [])
        if not any((root / s).is_dir() for s in names):
            raise SystemExit(
                f"no folder for split {split!r} in {root} (looked for {names}): the data "
                f"dir must hold one ImageFolder per split"
            )


def resolve_data(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    chans = data_config["input_size"][0]
    for key in ("mean", "std"):
        value = tuple(data_config[key])
        if len(value) != chans:  # e.g. --in-chans 1 with an RGB model config
            data_config[key] = (float(np.mean(value)),) * chans
    return data_config


def build_loaders(args, data_config, device, num_classes):
    chans = data_config["input_size"][0]
    img_mode = "RGB" if chans == 3 else "L" if chans == 1 else None
    if img_mode is None:
        raise SystemExit(f"ImageFolder inputs need 1 or 3 channels, the model takes {chans}")
    common = dict(
        root=args.data_dir,
        class_map=args.class_map,
        input_img_mode=img_mode,
        batch_size=args.batch_size,
    )
    dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True, **common)
    dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    collate_fn = mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    loader_kw = dict(
        use_prefetcher=args.prefetcher,
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if args.workers == 0:
        loader_kw["persistent_workers"] = False
    loader_train = create_loader(
        dataset_train,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=train_interpolation,
        collate_fn=collate_fn,
        **loader_kw,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=data_config["input_size"],
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **loader_kw,
    )
    return loader_train, loader_eval, mixup_fn, mixup_active


def soft_target_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).mean()


def sparse_structure(args) -> str | None:
    """``--sparse-structure``, or fan_in for SRigL, which needs constant fan-in."""
    if args.sparse_structure is None and args.sparse_method == "srigl":
        return "fan_in"
    return args.sparse_structure


def setup_sparsity(args, model: nn.Module) -> bool:
    """``sparsify`` the model for ``--sparse-method`` (a pruning method starts dense and
    is given the structure to prune to instead); whether the model is sparse."""
    if args.sparse_method == "dense":
        return False
    pruning = args.sparse_method in PRUNING_METHODS
    structure = sparse_structure(args)
    sparse_param.sparsify(
        model,
        density=1.0 if pruning else args.density,
        distribution=args.distribution,
        dense_first=args.dense_first,
        dense_last=args.dense_last,
        seed=args.sparse_seed,
        sparse_init=args.sparse_init,
        structure=None if pruning else structure,
    )
    _logger.info(
        f"Sparsified ({args.sparse_method}, {args.distribution}): density "
        f"{sparse_param.density(model):.4f} over "
        f"{sum(1 for _ in sparse_param.sparse_layers(model))} layers"
        + (f", pruning to {args.density}" if pruning else "")
        + (f", structure {structure}" if structure else "")
    )
    return True


def build_sparse_scheduler(args, model, optimizer, total_steps):
    """The sparse_param scheduler of ``--sparse-method`` (None for dense)."""
    method = args.sparse_method
    if method == "dense":
        return None
    if method == "static":
        return sparse_param.create_scheduler(method, model, optimizer)
    kwargs = dict(
        total_steps=total_steps,
        update_interval=args.update_interval,
        drop_fraction=args.drop_fraction,
        drop_schedule=args.drop_schedule,
        stop=args.sparse_stop,
        start=args.sparse_start,
        seed=args.sparse_seed,
    )
    if method in PRUNING_METHODS:
        kwargs.update(density=args.density, distribution=args.distribution)
        if args.sparse_structure is not None:
            kwargs.update(structure=args.sparse_structure)
    if method == "dsr":
        kwargs.update(threshold=args.dsr_threshold, target_pruned=args.dsr_target_pruned)
    return sparse_param.create_scheduler(method, model, optimizer, **kwargs)


def sparse_stats(model: nn.Module) -> dict[str, float]:
    if next(sparse_param.sparse_layers(model), None) is None:
        return {"density": 1.0, "itop_rate": 1.0}
    return {"density": sparse_param.density(model), "itop_rate": sparse_param.itop_rate(model)}


class TrainLog:
    """The columns of summary.csv (and ``sparse/*`` TensorBoard scalars) after timm's:
    ``density``, ``itop_rate`` (R_s), ``egf`` (Tessera et al.'s effective gradient flow
    of the last batch before the log point; NaN before the first one) and
    ``train_flops`` (training FLOPs so far, ``sparse_param.training_flops``: rebuilt
    from the sparse scheduler's history since the resumed step, plus the FLOPs before
    it, which checkpoints keep under ``"train_log"``).

    EGF is measured only at log points, right after ``optimizer.step()`` (``.grad`` still
    holds the batch's gradients, unscaled by then under AMP): nothing runs in between.
    """

    def __init__(self, sparse_scheduler, uses: dict[str, int], batch_size: int) -> None:
        self.sparse_scheduler, self.uses, self.batch_size = sparse_scheduler, uses, batch_size
        self.egf = float("nan")
        self._warned = False
        self.steps, self.flops = 0, 0.0  # at the last stats(): what checkpoints keep
        self._start = (0, 0.0)  # steps and FLOPs counted before this process

    def measure(self, model: nn.Module) -> float:
        """EGF of the gradients of the step just taken (NaN, warned once, if a layer
        has no gradient, e.g. one the forward never used)."""
        try:
            self.egf = sparse_param.effective_gradient_flow(model)
        except ValueError as error:
            if not self._warned:
                _logger.warning(f"EGF not logged: {error}")
                self._warned = True
            self.egf = float("nan")
        return self.egf

    def stats(self, model: nn.Module, num_updates: int) -> dict[str, float]:
        scheduler = self.sparse_scheduler
        self.steps = scheduler.step_count if scheduler is not None else num_updates
        start_step, start_flops = self._start
        self.flops = start_flops + sparse_param.training_flops(
            model,
            scheduler,
            steps=self.steps,
            start=start_step,
            batch_size=self.batch_size,
            uses=self.uses,
        )
        return {**sparse_stats(model), "egf": self.egf, "train_flops": self.flops}

    def state_dict(self) -> dict[str, float]:
        return {"step": self.steps, "flops": self.flops}

    def load_state_dict(self, state: dict[str, float] | None, resumed_step: int) -> None:
        """Continue a checkpoint's count; without one (an older checkpoint) the FLOPs
        before ``resumed_step`` are unknown and ``train_flops`` is NaN."""
        if state is None:
            _logger.warning("--resume: the checkpoint has no 'train_log': train_flops is NaN")
            state = {"step": resumed_step, "flops": float("nan")}
        self._start = (int(state["step"]), float(state["flops"]))
        self.steps, self.flops = self._start


def setup_train_log(args, model, sparse_scheduler, data_config, device) -> TrainLog:
    """A :class:`TrainLog`; the weight uses per sample (conv output positions) come from
    one eval-mode forward of a zero input of the data config's size."""
    example = torch.zeros(1, *data_config["input_size"], device=device)
    uses = sparse_param.weight_uses(model, example)
    return TrainLog(sparse_scheduler, uses, args.batch_size * args.world_size)


def _to_plain(value: Any) -> Any:
    """Checkpoint/JSON-friendly copy: tensors to lists, tuples to lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def load_resume_checkpoint(path: str) -> dict[str, Any]:
    """The training checkpoint ``--resume`` names, read as ``python -m sparse_param.export``
    reads it (:func:`sparse_param.checkpoint.load_checkpoint_file`)."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SystemExit(f"--resume {path}: not a training checkpoint (no 'state_dict')")
    return checkpoint


class SparseCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver whose checkpoints also hold the sparse scheduler state
    (key ``"sparse_scheduler"``) and the LR scheduler state (``"lr_scheduler"``).

    The sparse scheduler's state is saved once: the copy that rides in the optimizer's
    state dict (``sparse_param.SparseScheduler``) is left out. Older checkpoints hold
    both, and resume the same: the optimizer's copy is loaded, then the same state again.

    Ranking, ``last`` / ``model_best`` files and history pruning are timm's; only the
    checkpoint contents are built here.
    """

    def __init__(self, *args, sparse_scheduler=None, lr_scheduler=None, train_log=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sparse_scheduler = sparse_scheduler
        self.lr_scheduler = lr_scheduler
        self.train_log = train_log

    def checkpoint_state(self, epoch: int, metric: float | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": epoch,
            "arch": self.args.model if self.args is not None else type(self.model).__name__,
            "version": 2,  # timm: the epoch saved is complete; resume at epoch + 1
            "state_dict": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        state["optimizer"].pop(OPTIMIZER_STATE_KEY, None)  # kept under SPARSE_CHECKPOINT_KEY
        if self.args is not None:
            state["args"] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state["state_dict_ema"] = unwrap(self.model_ema.module).state_dict()
        if self.sparse_scheduler is not None:
            state[SPARSE_CHECKPOINT_KEY] = self.sparse_scheduler.state_dict()
        if self.lr_scheduler is not None:
            state[LR_SCHEDULER_CHECKPOINT_KEY] = self.lr_scheduler.state_dict()
        if self.train_log is not None:
            state["train_log"] = self.train_log.state_dict()
        if metric is not None:
            state["metric"] = metric
        if hasattr(super(), "state_dict"):  # timm >= 1.0.2x: history for resumes
            state["saver"] = self.state_dict(epoch, metric)
        return state

    def _save(self, save_path, epoch, metric=None):
        torch.save(self.checkpoint_state(epoch, metric), save_path)


def append_summary(
    path: Path, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float, extra: dict
) -> None:
    """One row of timm's summary.csv (epoch, train_*, eval_*, lr) plus ``extra``."""
    row = OrderedDict(epoch=epoch)
    row.update((f"train_{k}", v) for k, v in train_metrics.items())
    row.update((f"eval_{k}", v) for k, v in eval_metrics.items())
    row["lr"] = lr
    row.update(extra)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def trim_summary(path: Path, start_epoch: int) -> None:
    """Drop rows at or after ``start_epoch`` (a resume into the run's own directory)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and float(r[0]) < start_epoch]
    if len(keep) != len(body):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(keep)


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size


# ----------------------------------------------------------------- train / validate


@dataclass
class Training:
    """What the epochs use, set up by :func:`main` in timm's order: model → sparsity →
    loaders → optimizer and schedules → resume → EMA, compile, DDP → outputs."""

    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    sparse_scheduler: Any  # the sparse_param scheduler, None for dense
    train_log: TrainLog
    loader_train: Any
    loader_eval: Any
    mixup_fn: Any
    train_loss_fn: Any
    amp_autocast: Any
    loss_scaler: Any
    model_ema: Any = None
    start_epoch: int = 0
    num_updates: int = 0
    output_dir: Path | None = None
    saver: Any = None
    tb_writer: Any = None

    @property
    def updates_per_epoch(self) -> int:
        return len(self.loader_train)


def train_one_epoch(epoch: int, t: Training) -> OrderedDict:
    """One epoch of optimizer steps; ``t.num_updates`` counts them. Returns the mean loss."""
    args, loader = t.args, t.loader_train
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, "mixup_enabled", False):
            loader.mixup_enabled = False
        elif t.mixup_fn is not None:
            t.mixup_fn.mixup_enabled = False
    t.model.train()
    losses, batch_time = AverageMeter(), AverageMeter()
    last_idx = len(loader) - 1
    seen_updates = len(t.sparse_scheduler.history) if t.sparse_scheduler is not None else 0
    end = time.time()
    for batch_idx, (inputs, target) in enumerate(loader):
        loss, batch_size = train_step(t, inputs, target)
        t.num_updates += 1
        losses.update(loss.item(), batch_size)
        if t.model_ema is not None:
            t.model_ema.update(t.model, step=t.num_updates)
        if t.lr_scheduler is not None:
            t.lr_scheduler.step_update(num_updates=t.num_updates, metric=losses.avg)
        batch_time.update(time.time() - end)
        end = time.time()
        seen_updates = log_topology_updates(t, seen_updates)
        if batch_idx % args.log_interval == 0 or batch_idx == last_idx:
            t.train_log.measure(t.model)
            if is_primary(args):
                log_progress(t, epoch, (batch_idx, last_idx + 1), losses, batch_time)
    loss_avg = losses.avg
    if args.distributed:
        loss_avg = float(all_reduce_mean(torch.tensor(loss_avg, device=t.device), args.world_size))
    return OrderedDict(loss=loss_avg)


def train_step(t: Training, inputs: torch.Tensor, target: torch.Tensor) -> tuple[Any, int]:
    """Forward, backward and one optimizer step on a batch; the loss and the batch size."""
    args = t.args
    if not args.prefetcher:
        inputs, target = inputs.to(t.device), target.to(t.device)
        if t.mixup_fn is not None:
            inputs, target = t.mixup_fn(inputs, target)
    if args.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with t.amp_autocast():
        output = t.model(inputs)
        loss = t.train_loss_fn(output, target)
    t.optimizer.zero_grad()
    if t.loss_scaler is not None:
        t.loss_scaler(
            loss,
            t.optimizer,
            clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
            parameters=t.model.parameters(),
        )
    else:
        loss.backward()
        if args.clip_grad is not None:
            if args.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(t.model.parameters(), args.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(t.model.parameters(), args.clip_grad)
        t.optimizer.step()
    return loss, inputs.size(0)


def log_topology_updates(t: Training, seen_updates: int) -> int:
    """Log the sparse scheduler's updates after the first ``seen_updates``; their count."""
    scheduler = t.sparse_scheduler
    if scheduler is None or len(scheduler.history) <= seen_updates:
        return seen_updates
    for record in scheduler.history[seen_updates:]:
        pruned = sum(record["pruned"].values())
        grown = sum(record["grown"].values())
        if is_primary(t.args):
            _logger.info(
                f"Topology update at step {record['step']}: drop fraction "
                f"{record['drop_fraction']:.4f}, pruned {pruned}, grown {grown}, "
                f"density {record['density']:.4f}, R_s {record['itop_rate']:.4f}"
            )
        if t.tb_writer is not None:
            for key in ("drop_fraction", "density", "itop_rate", "egf"):
                if record.get(key) is not None:
                    t.tb_writer.add_scalar(f"sparse_update/{key}", record[key], record["step"])
    return len(scheduler.history)


def log_progress(
    t: Training, epoch: int, batch: tuple[int, int], losses: AverageMeter, batch_time: AverageMeter
) -> None:
    """The log line of a log point (``batch``: index and batches per epoch), and its
    TensorBoard scalars."""
    batch_idx, batches = batch
    lr = t.optimizer.param_groups[0]["lr"]
    stats = sparse_stats(t.model)
    _logger.info(
        f"Train: {epoch} [{batch_idx:>4d}/{batches} "
        f"({100.0 * (batch_idx + 1) / batches:>3.0f}%)]  "
        f"Loss: {losses.val:#.4g} ({losses.avg:#.4g})  "
        f"Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s)  LR: {lr:.3e}  "
        f"Density: {stats['density']:.4f}  R_s: {stats['itop_rate']:.4f}  "
        f"EGF: {t.train_log.egf:.3e}"
    )
    if t.tb_writer is not None:
        t.tb_writer.add_scalar("train/loss", losses.val, t.num_updates)
        t.tb_writer.add_scalar("train/lr", lr, t.num_updates)
        t.tb_writer.add_scalar("train/egf", t.train_log.egf, t.num_updates)


@torch.no_grad()
def validate(model, loader, args, *, device, amp_autocast, log_suffix=""):
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, top1·n, top5·n, n
    for inputs, target in loader:
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(inputs)
        output = output.float()
        n = inputs.size(0)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        totals += torch.tensor(
            [float(loss_fn(output, target)) * n, float(acc1) * n, float(acc5) * n, n],
            dtype=torch.float64,
            device=device,
        )
    if args.distributed:
        dist.all_reduce(totals)
    count = max(float(totals[3]), 1.0)
    metrics = OrderedDict(
        loss=float(totals[0]) / count, top1=float(totals[1]) / count, top5=float(totals[2]) / count
    )
    if is_primary(args):
        _logger.info(
            f"Test{log_suffix}: Loss: {metrics['loss']:.4f}  Acc@1: {metrics['top1']:.3f}  "
            f"Acc@5: {metrics['top5']:.3f}"
        )
    return metrics


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args, args_text = parse_args(argv)
    device = setup_run(args)
    # the model, then sparsify (before the optimizer, the EMA and any wrapper)
    model = setup_model(args)
    data_config = resolve_data(args, model)
    sparse = setup_sparsity(args, model)
    model = place_model(args, model, device)
    t = setup_training(args, model, data_config, device)
    checkpoint = resume(t)
    t.model_ema = setup_ema(args, t.model, checkpoint)
    del checkpoint  # its tensors are not kept through training
    t.model = wrap_model(args, t.model, device)
    setup_outputs(t, args_text)
    eval_metrics, best = train_epochs(t)
    return finish(t, sparse, eval_metrics, best)


def setup_run(args: argparse.Namespace) -> torch.device:
    """Device and process group, logging on rank 0 only, the seed; checks the data dir."""
    device = setup_device(args)
    if not is_primary(args):
        _logger.setLevel(logging.WARNING)
    args.prefetcher = not args.no_prefetcher
    seed_everything(args.seed + args.rank)
    check_dataset(args)
    return device


def setup_model(args: argparse.Namespace) -> nn.Module:
    """timm's ``create_model`` from the flags; fills in ``--num-classes`` and
    ``--in-chans`` from the model when they are not given."""
    model = timm.create_model(
        args.model,
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        in_chans=args.input_size[0] if args.input_size else args.in_chans,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        **args.model_kwargs,
    )
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.in_chans is None and args.input_size is None:  # the model's own, e.g. 1 for LeNet
        cfg_size = getattr(model, "pretrained_cfg", {}).get("input_size") or (3,)
        args.in_chans = getattr(model, "in_chans", cfg_size[0])
    _logger.info(
        f"Model {args.model} created, param count: {sum(p.numel() for p in model.parameters())}"
    )
    return model


def place_model(args: argparse.Namespace, model: nn.Module, device: torch.device) -> nn.Module:
    """The (sparsified) model on its device, channels-last and SyncBatchNorm as asked."""
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def setup_training(
    args: argparse.Namespace, model: nn.Module, data_config: dict[str, Any], device: torch.device
) -> Training:
    """Loaders, optimizer, LR schedule, the sparse scheduler (attached to the optimizer;
    ``total_steps`` = epochs × updates per epoch), the train log, losses and AMP."""
    loader_train, loader_eval, mixup_fn, mixup_active = build_loaders(
        args, data_config, device, args.num_classes
    )
    optimizer, lr_scheduler, num_epochs = setup_optimizer(args, model, len(loader_train))
    total_steps = num_epochs * len(loader_train)
    sparse_scheduler = build_sparse_scheduler(args, model, optimizer, total_steps)
    if sparse_scheduler is not None:
        _logger.info(f"Sparse scheduler: {sparse_scheduler!r}")
    train_log = setup_train_log(args, model, sparse_scheduler, data_config, device)
    amp_autocast, loss_scaler = setup_amp(args, device)
    if mixup_active:
        train_loss_fn = soft_target_cross_entropy  # smoothing is in the mixed targets
    else:
        train_loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    return Training(
        args=args,
        device=device,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        num_epochs=num_epochs,
        sparse_scheduler=sparse_scheduler,
        train_log=train_log,
        loader_train=loader_train,
        loader_eval=loader_eval,
        mixup_fn=mixup_fn,
        train_loss_fn=train_loss_fn,
        amp_autocast=amp_autocast,
        loss_scaler=loss_scaler,
    )


def setup_optimizer(
    args: argparse.Namespace, model: nn.Module, updates_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any, int]:
    """timm's optimizer and LR scheduler from the flags; the number of epochs it schedules."""
    opt_kwargs: dict[str, Any] = dict(
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, **opt_kwargs)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones,
        cooldown_epochs=args.cooldown_epochs,
        patience_epochs=args.patience_epochs,
        decay_rate=args.decay_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        warmup_prefix=args.warmup_prefix,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, lr_scheduler, num_epochs


def setup_amp(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """The autocast context and the loss scaler (None: no scaling) of ``--amp``."""
    amp_autocast = nullcontext
    loss_scaler = None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
        if device.type == "cpu":
            amp_dtype = torch.bfloat16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == "cuda" and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
        scaling = " with loss scaling" if loss_scaler else ""
        _logger.info(f"AMP: autocast to {amp_dtype}{scaling}")
    return amp_autocast, loss_scaler


def resume(t: Training) -> dict[str, Any] | None:
    """``--resume``: restore the model, optimizer, AMP scaler, LR scheduler, sparse
    scheduler and train log, and the epoch to start at (``--start-epoch`` wins); the
    checkpoint, for the EMA (None without ``--resume``)."""
    args, sparse_scheduler = t.args, t.sparse_scheduler
    checkpoint = None
    if args.resume:
        checkpoint = load_resume_checkpoint(args.resume)
        sparse_param.load_state_dict(t.model, checkpoint["state_dict"])
        if not args.no_resume_opt:
            t.optimizer.load_state_dict(checkpoint["optimizer"])
            if t.loss_scaler is not None and t.loss_scaler.state_dict_key in checkpoint:
                t.loss_scaler.load_state_dict(checkpoint[t.loss_scaler.state_dict_key])
            if LR_SCHEDULER_CHECKPOINT_KEY in checkpoint:
                t.lr_scheduler.load_state_dict(checkpoint[LR_SCHEDULER_CHECKPOINT_KEY])
        if sparse_scheduler is not None:
            if SPARSE_CHECKPOINT_KEY not in checkpoint:
                raise SystemExit(
                    f"--resume {args.resume}: the checkpoint has no sparse scheduler state "
                    f"('{SPARSE_CHECKPOINT_KEY}'); was it saved by a dense run?"
                )
            sparse_scheduler.load_state_dict(checkpoint[SPARSE_CHECKPOINT_KEY])
        t.start_epoch = checkpoint["epoch"] + (1 if checkpoint.get("version", 1) > 1 else 0)
        resumed_step = (
            t.start_epoch * t.updates_per_epoch
            if sparse_scheduler is None
            else sparse_scheduler.step_count
        )
        t.train_log.load_state_dict(checkpoint.get("train_log"), resumed_step)
        _logger.info(
            f"Resumed from {args.resume} (epoch {checkpoint['epoch']})"
            + (f", sparse step {sparse_scheduler.step_count}" if sparse_scheduler else "")
        )
    if args.start_epoch is not None:
        t.start_epoch = args.start_epoch
    t.num_updates = t.start_epoch * t.updates_per_epoch
    if t.lr_scheduler is not None and t.start_epoch > 0:
        if args.sched_on_updates:
            t.lr_scheduler.step_update(t.num_updates)
        else:
            t.lr_scheduler.step(t.start_epoch)
    return checkpoint


def setup_ema(
    args: argparse.Namespace, model: nn.Module, checkpoint: dict[str, Any] | None
) -> ModelEmaV3 | None:
    """``--model-ema``: a deepcopy made after sparsify, so it tracks the live masks;
    restored from a resumed checkpoint's ``state_dict_ema``."""
    if not args.model_ema:
        return None
    model_ema = ModelEmaV3(
        model,
        decay=args.model_ema_decay,
        use_warmup=args.model_ema_warmup,
        device=torch.device("cpu") if args.model_ema_force_cpu else None,
    )
    if checkpoint is not None and "state_dict_ema" in checkpoint:
        model_ema.module.load_state_dict(checkpoint["state_dict_ema"])
    return model_ema


def wrap_model(args: argparse.Namespace, model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` and DistributedDataParallel, as asked."""
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if args.distributed:
        # Buffers (BN statistics; masks, identical on every rank) are synced at init and,
        # unless --no-ddp-bb, from rank 0 before every forward, as in timm.
        ddp_params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        new_name = "forward_sync_buffers" in ddp_params  # torch >= 2.14
        sync_key = "forward_sync_buffers" if new_name else "broadcast_buffers"
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            **{sync_key: not args.no_ddp_bb},
        )
    return model


def setup_outputs(t: Training, args_text: str) -> None:
    """On rank 0: the output folder with ``args.yaml``, the checkpoint saver, the summary
    (trimmed to the resumed epoch) and the TensorBoard writer."""
    args = t.args
    if not is_primary(args):
        return
    exp_name = args.experiment or "-".join(
        [
            datetime.now().strftime("%Y%m%d-%H%M%S"),
            args.model.replace("/", "_"),
            args.sparse_method,
            f"d{args.density:g}",
        ]
    )
    output_dir = Path(args.output or "./output/train") / exp_name
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "args.yaml").write_text(args_text)
    t.output_dir = output_dir
    t.saver = SparseCheckpointSaver(
        model=t.model,
        optimizer=t.optimizer,
        args=args,
        model_ema=t.model_ema,
        amp_scaler=t.loss_scaler,
        checkpoint_dir=str(output_dir),
        recovery_dir=str(output_dir),
        decreasing=args.eval_metric == "loss",
        max_history=args.checkpoint_hist,
        sparse_scheduler=t.sparse_scheduler,
        lr_scheduler=t.lr_scheduler,
        train_log=t.train_log,
    )
    if args.resume and hasattr(t.saver, "load_state_dict_from_checkpoint"):
        resumed_dir = Path(args.resume).resolve().parent
        if resumed_dir == output_dir.resolve():
            t.saver.load_state_dict_from_checkpoint(args.resume)
    trim_summary(output_dir / "summary.csv", t.start_epoch)
    if args.log_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _logger.warning("--log-tensorboard: tensorboard is not installed, skipping")
        else:
            t.tb_writer = SummaryWriter(
                log_dir=str(output_dir / "tensorboard"), purge_step=t.num_updates or None
            )
    _logger.info(
        f"Output: {output_dir}; scheduled epochs: {t.num_epochs} "
        f"({t.updates_per_epoch} updates each)"
    )


def train_epochs(t: Training) -> tuple[dict[str, float], tuple[Any, Any]]:
    """The epochs from ``t.start_epoch``: train, share BatchNorm statistics, evaluate
    (and the EMA), write the summary row and the checkpoint, step the LR schedule.
    Returns the last evaluation and the saver's best (metric, epoch)."""
    args = t.args
    best = (None, None)
    eval_metrics: dict[str, float] = {}
    for epoch in range(t.start_epoch, t.num_epochs):
        seed_everything(epoch_seed(args, epoch))
        if args.distributed and hasattr(t.loader_train.sampler, "set_epoch"):
            t.loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(epoch, t)
        eval_metrics = evaluate(t)
        stats = t.train_log.stats(t.model, t.num_updates)
        if t.output_dir is not None:
            record_epoch(t, epoch, train_metrics, eval_metrics, stats)
            best = t.saver.save_checkpoint(epoch, metric=eval_metrics.get(args.eval_metric))
        if t.lr_scheduler is not None:
            t.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
        _logger.info(
            f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, eval top1 "
            f"{eval_metrics['top1']:.2f}, density {stats['density']:.4f}, "
            f"R_s {stats['itop_rate']:.4f}"
        )
    return eval_metrics, best


def evaluate(t: Training) -> dict[str, float]:
    """Validation metrics of the model and, as ``ema_*``, of its EMA; BatchNorm
    statistics shared across ranks first (``--dist-bn``)."""
    args = t.args
    share_bn = args.distributed and args.dist_bn in ("broadcast", "reduce")
    if share_bn:
        distribute_bn(t.model, args.world_size, args.dist_bn == "reduce")
    kw = dict(device=t.device, amp_autocast=t.amp_autocast)
    eval_metrics = validate(t.model, t.loader_eval, args, **kw)
    if t.model_ema is not None:
        if share_bn:
            distribute_bn(t.model_ema, args.world_size, args.dist_bn == "reduce")
        ema_metrics = validate(t.model_ema, t.loader_eval, args, log_suffix=" (EMA)", **kw)
        eval_metrics.update((f"ema_{k}", v) for k, v in ema_metrics.items())
    return eval_metrics


def record_epoch(
    t: Training, epoch: int, train_metrics: dict, eval_metrics: dict, stats: dict
) -> None:
    """The epoch's row of summary.csv and its TensorBoard scalars."""
    lr = t.optimizer.param_groups[0]["lr"]
    append_summary(t.output_dir / "summary.csv", epoch, train_metrics, eval_metrics, lr, stats)
    if t.tb_writer is not None:
        for key, value in {
            **{f"eval/{k}": v for k, v in eval_metrics.items()},
            **{f"sparse/{k}": v for k, v in stats.items()},
            "train/epoch_loss": train_metrics["loss"],
        }.items():
            t.tb_writer.add_scalar(key, value, epoch)


def finish(
    t: Training, sparse: bool, eval_metrics: dict[str, float], best: tuple[Any, Any]
) -> dict[str, Any]:
    """The end: ``sparse_history.json``, the plots, plain weights, the per-layer table;
    the process group is torn down. Returns what the run reached."""
    model, output_dir = t.model, t.output_dir
    result = {"output_dir": output_dir, "eval": eval_metrics, "best": best, **sparse_stats(model)}
    if output_dir is not None:
        if t.tb_writer is not None:
            t.tb_writer.close()
        if t.sparse_scheduler is not None:
            (output_dir / "sparse_history.json").write_text(
                json.dumps(_to_plain(t.sparse_scheduler.history), indent=1)
            )
        if not t.args.no_plots:
            make_plots(t.args, model, output_dir)
        for path in write_plain_weights(model, t.model_ema, output_dir):
            _logger.info(f"Plain weights for timm's validate.py --checkpoint: {path}")
        if sparse:
            print(sparse_param.summary(model))
        else:
            print("dense model: no sparse layers")
        if best[0] is not None:
            _logger.info(f"*** Best metric: {best[0]} (epoch {best[1]})")
    if t.args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def write_plain_weights(model: nn.Module, model_ema, output_dir: Path) -> list[Path]:
    """Write the final weights (and the EMA's) in timm's plain layout:
    ``model_plain.safetensors`` / ``model_ema_plain.safetensors``, which timm's
    ``validate.py --checkpoint`` and ``create_model(pretrained_cfg_overlay=dict(file=...))``
    load unmodified. Returns the paths written; a model with weight-standardized sparse
    convolutions has no plain form (their sparse weight exists only after
    standardization): warn and keep the sparse checkpoints only."""
    nets = {"model_plain": model, "model_ema_plain": model_ema and model_ema.module}
    written = []
    for name, net in nets.items():
        if net is None:
            continue
        path = output_dir / f"{name}.safetensors"
        try:
            sparse_param.save_safetensors(net, path)
        except ValueError as error:
            _logger.warning(f"No {path.name}: {error}")
            continue
        written.append(path)
    return written


def make_plots(args: argparse.Namespace, model: nn.Module, output_dir: Path) -> None:
    """training_curves.png (accuracy and R_s over epochs) and layer_density.png."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _logger.warning("matplotlib is not installed: no plots")
        return
    summary_path = output_dir / "summary.csv"
    if summary_path.exists():
        columns = plots.load_summary(summary_path)
        if columns.get("epoch"):
            series = {
                "epoch": columns["epoch"],
                "accuracy": columns["eval_top1"],
                "itop_rate": columns["itop_rate"],
                "density": columns["density"],
            }
            runs = {args.sparse_method: series}
            if "eval_ema_top1" in columns:
                runs[f"{args.sparse_method} (EMA)"] = {
                    "epoch": columns["epoch"],
                    "accuracy": columns["eval_ema_top1"],
                }
            plots.plot_training_curves(
                runs,
                output_dir / "training_curves.png",
                accuracy="accuracy",
                title=f"{args.model}, {args.sparse_method}, density {args.density:g}",
            )
    if next(sparse_param.sparse_layers(model), None) is not None:
        rows = sparse_param.layer_table(model)
        allocations = {
            "allocated": {r["name"]: r["allocated"] / r["numel"] for r in rows},
            "final": {r["name"]: r["density"] for r in rows},
            "R_s": {r["name"]: r["itop_rate"] for r in rows},
        }
        plots.plot_layer_density(
            allocations,
            output_dir / "layer_density.png",
            numel={r["name"]: r["numel"] for r in rows},
            target=args.density,
            title=f"{args.model}: per-layer density ({args.distribution})",
        )


if __name__ == "__main__":
    main()
