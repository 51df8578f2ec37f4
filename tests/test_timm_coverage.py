"""CI sample of the timm coverage sweep (benchmarks/timm_coverage.py).

A fixed, diverse sample of timm families goes through the sweep's own per-model check
(``check_model``): create with random init at 64 px (or the default size), sparsify to
0.05, one SGD step with a RigL update at step 1, ``effective_density`` in train mode
(no op receives a non-zero weight outside its mask) and ``density`` == 0.05 within one
weight. The full sweep and its table are in docs/timm_coverage.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "timm_coverage.py"

# model name: what it covers
SAMPLE = {
    "resnet18": "plain Conv2d / Linear, BatchNorm",
    "resnetv2_50x1_bit": "StdConv2d (weight standardized in forward)",
    "nf_regnet_b0": "ScaledStdConv2d (standardized with gain), SE, no norm layers",
    "tf_efficientnet_b0": "Conv2dSame (TF 'same' padding), depthwise convs",
    "mobilenetv3_small_050": "hard-swish, SE with 1x1 convs, tiny channel counts",
    "convnext_atto": "depthwise 7x7 conv, LayerNorm2d, Linear MLP in NHWC",
    "vit_tiny_patch16_224": "ViT at img_size=64 (fixed-size model), qkv Linear",
    "swin_tiny_patch4_window7_224": "windowed attention at img_size=64",
    "levit_128s": "attention with conv-BN linear layers, distillation head",
    "ghostnet_100": "ghost modules (cheap depthwise ops), SE",
    "mobileone_s0": "train-time reparameterizable branches",
    "coatnet_nano_rw_224": "conv + transformer hybrid (MBConv, rel-pos attention)",
    "efficientformer_l1": "meta-former: pooling mixer, 4D/3D stages, distilled head",
    "eva02_tiny_patch14_224": "qkv weight read by the parent: F.linear(x, self.qkv.weight, b)",
}

# Models of the sample that fail the check, as strict xfails (none at present).
KNOWN_FAILURES: dict[str, str] = {}


def _load_script():
    spec = importlib.util.spec_from_file_location("timm_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("timm_coverage", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coverage():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _load_script()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n]))
        if n in KNOWN_FAILURES
        else n
        for n in SAMPLE
    ],
)
def test_timm_model_trains_sparse(coverage, name):
    rec = coverage.check_model(name, num_classes=10, density=0.05, limit_params=None)
    assert rec["status"] == "pass", (
        f"{name} ({SAMPLE[name]}): {rec['status']}: {rec['reason']} "
        f"[{rec.get('stage')} @ {rec.get('where')}]\n{rec.get('trace', '')}"
    )
    assert rec["layers"] > 0
    assert abs(rec["density"] - 0.05) < 1e-4


def test_check_model_reports_skips_and_failures(coverage, monkeypatch):
    """The check classifies instead of raising: too big is a skip with the count, and an
    exception in the library is a failure with its type, stage and location."""
    rec = coverage.check_model("resnet18", limit_params=1e6)
    assert rec["status"] == "skip"
    assert "M params > limit" in rec["reason"]

    import sparse_param

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(sparse_param, "effective_density", broken)
    rec = coverage.check_model("resnet18", img_size=32)
    assert rec["status"] == "fail"
    assert rec["reason"] == "RuntimeError: boom"
    assert rec["stage"] == "effective_density"


@pytest.mark.slow
def test_sweep_runs_in_worker_processes_resumes_and_reports(coverage, tmp_path):
    """The sweep end to end on two models: worker process, jsonl, Markdown report,
    --resume (nothing re-run), and a timeout that kills the worker and is recorded."""
    import json

    jsonl, out = tmp_path / "r.jsonl", tmp_path / "r.md"
    common = ["--filter", "resnet1[04]t", "--jsonl", str(jsonl), "--out", str(out)]
    assert coverage.main([*common, "--limit-params", "6e6"]) == 0
    recs = {r["model"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert recs["resnet10t"]["status"] == "pass", recs["resnet10t"]
    assert recs["resnet14t"]["status"] == "skip"  # 8.05 M params
    assert recs["resnet14t"]["reason"] == "8.1 M params > limit 6 M"
    report = out.read_text()
    assert "**Totals: 1 passed / 0 failed / 1 skipped out of 2 models**" in report
    assert "| resnet10t | 4.93 | 64x64 | pass |" in report

    assert coverage.main([*common, "--resume"]) == 0  # nothing left to run
    assert len(jsonl.read_text().splitlines()) == 2
    runs = (tmp_path / "r.runs.jsonl").read_text().splitlines()
    assert [json.loads(r)["models"] for r in runs] == [2, 0]

    slow = ["--filter", "resnet10t", "--jsonl", str(tmp_path / "t.jsonl"), "--out", str(out)]
    assert coverage.main([*slow, "--timeout-per-model", "0.5"]) == 0
    (rec,) = map(json.loads, (tmp_path / "t.jsonl").read_text().splitlines())
    assert rec["status"] == "fail" and rec["reason"].startswith("Timeout"), rec


@pytest.mark.parametrize("name", ["vit_huge_patch14_224", "convnext_large", "resnet18"])
def test_models_over_the_limit_get_the_meta_device_check(coverage, name):
    """Over ``limit_params`` with ``meta_above_limit``: targeting, allocation and a
    meta-device forward instead of a skip (resnet18 with a 1 M limit stands for a model
    too big; the check builds nothing with storage)."""
    rec = coverage.check_model(name, limit_params=1e6, meta_above_limit=True)
    assert rec["status"] == "pass", (rec["reason"], rec.get("stage"), rec.get("trace"))
    assert rec["mode"] == "meta"
    assert rec["layers"] > 0
    assert abs(rec["density"] - 0.05) < 1e-4
