"""The README's first command at reduced size (one seed), with its default sparse-aware
init: gradient-guided growth (RigL) beats the static mask; SET explores. With that init
the static mask itself trains at 98% sparsity (90.0% on seed 0, 84.7% with the dense
init), and SET's random regrowth is level with it here (89.4%), so only RigL's margin is
asserted; the README's table has all methods over three seeds."""

from __future__ import annotations

import pytest
import torch

from sparse_param.demo import DemoConfig, format_table, run_demo


@pytest.mark.slow
def test_demo_gradient_guided_growth_beats_static(tmp_path, capsys):
    torch.set_num_threads(1)
    config = DemoConfig(seeds=(0,))
    assert config.sparse_init  # the demo runs sparsify's default
    results = run_demo(config, ("dense", "static", "set", "rigl"), tmp_path)
    by_method = {r.method: r for r in results}

    assert by_method["rigl"].accuracy > by_method["static"].accuracy
    assert by_method["dense"].accuracy > by_method["rigl"].accuracy
    assert by_method["static"].itop_rate == pytest.approx(config.density, abs=1e-4)
    for method in ("set", "rigl"):
        assert by_method[method].itop_rate > 1.5 * config.density
        assert by_method[method].density == pytest.approx(config.density, abs=1e-4)
    # Sparse training costs about the density in FLOPs; RigL pays a dense weight
    # gradient on the steps before its updates.
    assert by_method["static"].flops == pytest.approx(config.density, rel=0.05)
    assert by_method["static"].flops < by_method["rigl"].flops < 0.1

    printed = capsys.readouterr().out
    assert format_table(results, config) in printed
    assert (tmp_path / "demo_curves.png").stat().st_size > 10_000
    assert (tmp_path / "demo_allocation.png").stat().st_size > 10_000


def test_demo_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        run_demo(DemoConfig(epochs=1, seeds=(0,)), ("dense", "magic"), tmp_path)


def test_demo_reports_training_time_per_method(tmp_path, capsys):
    torch.set_num_threads(1)
    config = DemoConfig(epochs=1, seeds=(0,), compute="sparse")
    results = run_demo(config, ("dense", "static"), None)
    assert all(r.seconds > 0 for r in results)
    table = format_table(results, config)
    assert "| training time (s) |" in table and "compute 'sparse'" in table
    for r in results:
        assert f"| {r.seconds:.1f} |" in table


def test_demo_no_sparse_init_keeps_the_dense_init(capsys):
    torch.set_num_threads(1)
    runs = {
        init: run_demo(DemoConfig(epochs=1, seeds=(0,), sparse_init=init), ("static",), None)[0]
        for init in (True, False)
    }
    assert "sparse_init=False" in capsys.readouterr().out
    assert runs[True].accuracy != runs[False].accuracy
