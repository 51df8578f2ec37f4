"""Importing sparse_param changes nothing outside it: no timm, torchvision or matplotlib
import, no model registered with timm, no study loaded; the public API is ``__all__``."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S

import sparse_param as sp

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "torchvision", "matplotlib", "tensorboard", "mlxtend")
OURS_ON_DEMAND = ("sparse_param.models", "sparse_param.plots", "sparse_param.study")
PAPER_MODELS = ("lenet_300_100", "mlp_cifar", "set_mlp_cifar", "wrn_28_2", "cifar_vgg16")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); it prints JSON."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_import_loads_no_heavy_dependency_and_no_study():
    loaded = _python("import json, sys, sparse_param\nprint(json.dumps(sorted(sys.modules)))")
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & set(HEAVY), sorted(tops & set(HEAVY))
    assert not [m for m in loaded if m.startswith(OURS_ON_DEMAND)]


def test_import_registers_no_timm_model_and_the_models_module_does():
    pytest.importorskip("timm")
    found = _python(
        "import json, timm\n"
        "before = set(timm.list_models())\n"
        "import sparse_param\n"
        "after_package = set(timm.list_models())\n"
        "import sparse_param.models\n"
        "after_models = set(timm.list_models())\n"
        "print(json.dumps([sorted(after_package - before), sorted(after_models - before)]))"
    )
    assert found[0] == []
    assert set(PAPER_MODELS) <= set(found[1])


def test_public_api_is_what_a_user_calls():
    assert len(sp.__all__) == len(set(sp.__all__))
    assert all(hasattr(sp, name) for name in sp.__all__)
    exported = {name: getattr(sp, name) for name in sp.__all__}
    assert not [name for name, value in exported.items() if inspect.ismodule(value)]
    assert "apportion" not in sp.__all__
    assert {"create_scheduler", "ALGORITHMS", "sparsify", "finalize"} <= set(sp.__all__)
