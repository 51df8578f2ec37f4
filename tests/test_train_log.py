"""recipes/train.py's gradient-flow and cost logging: summary.csv and TensorBoard carry
egf, density, itop_rate and train_flops (LeNet-300-100, one epoch, in process)."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_script import _summary, mnist_folder, train  # noqa: F401  (fixture)

TRAIN_IMAGES, BATCH = 200, 25  # 8 optimizer steps of 25 samples
LENET_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


def _args(data, out, method: str, density: float) -> list[str]:
    sparse = [] if method == "dense" else ["--density", str(density)]  # dense reads none
    return [
        "--data-dir", str(data), "--model", "lenet_300_100", "--batch-size", str(BATCH),
        "--epochs", "1", "--lr", "0.05", "--warmup-epochs", "0", "--no-aug",
        "--smoothing", "0", "--sparse-method", method, *sparse,
        "--workers", "0", "--device", "cpu", "--output", str(out), "--experiment", method,
        "--log-interval", "3", "--no-plots", "--log-tensorboard",
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["static", "dense"])
def test_summary_and_tensorboard_carry_egf_and_training_flops(mnist_folder, tmp_path, method):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train.main(_args(mnist_folder, tmp_path, method, 0.1))
    finally:
        torch.set_num_threads(threads)
    rows = _summary(result["output_dir"] / "summary.csv")
    assert len(rows) == 1
    row = rows[0]
    for column in ("density", "itop_rate", "egf", "train_flops"):
        assert column in row, column
    steps = TRAIN_IMAGES // BATCH
    active = round(0.1 * LENET_WEIGHTS) if method == "static" else LENET_WEIGHTS
    # static: masks never change; every layer is a Linear on vectors (one use per weight)
    assert float(row["train_flops"]) == 6 * active * steps * BATCH
    assert float(row["density"]) == pytest.approx(active / LENET_WEIGHTS, abs=1e-6)
    egf = float(row["egf"])
    assert math.isfinite(egf) and egf > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result["output_dir"] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/egf", "sparse/egf", "sparse/train_flops", "sparse/itop_rate"} <= tags
    # measured at the log points only: batches 0, 3, 6 and the last (7)
    assert [e.step for e in events.Scalars("train/egf")] == [1, 4, 7, 8]
    assert events.Scalars("sparse/egf")[0].value == pytest.approx(egf, rel=1e-6)
