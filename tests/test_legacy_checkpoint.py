"""A checkpoint written before the restructuring (commit e27b949) still loads and resumes
bit-identically (model, optimizer, scheduler of RigL, SNFS, DSR, GraNet and SRigL).

``tests/fixtures/legacy_checkpoints.pt`` holds, per algorithm, the state dicts saved at
step ``SAVED_AT`` of the run in ``legacy_run.py`` and where that run was at ``END``
(weights, masks, optimizer state, update records), all written by the old code.
"""

from __future__ import annotations

import helpers
import legacy_run
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


@pytest.fixture
def runs():
    # Fresh per test: the optimizer adopts the loaded state tensors and steps them in place.
    return torch.load(legacy_run.FIXTURE, weights_only=True)


@pytest.mark.parametrize("via", ["optimizer", "scheduler"])
@pytest.mark.parametrize("name", list(legacy_run.ALGORITHMS))
def test_an_old_checkpoint_resumes_bit_identically(runs, name, via):
    run = runs[name]
    model, optimizer, scheduler = legacy_run.build(name)
    model.load_state_dict(run["saved"]["model"])
    optimizer_state = dict(run["saved"]["optimizer"])
    if via == "scheduler":
        del optimizer_state["sparse_param"]  # a script that saved the scheduler alone
    optimizer.load_state_dict(optimizer_state)
    if via == "scheduler":
        scheduler.load_state_dict(run["saved"]["scheduler"])
    assert scheduler.step_count == legacy_run.SAVED_AT

    legacy_run.train(model, optimizer, range(legacy_run.SAVED_AT, legacy_run.END))

    assert scheduler.state_dict()["history"] == run["end_history"]
    end = model.state_dict()
    assert end.keys() == run["end_model"].keys()
    for key, value in run["end_model"].items():
        assert torch.equal(end[key], value), key
    state = optimizer.state_dict()["state"]
    for index, saved in run["end_optimizer"]["state"].items():
        for key, value in saved.items():
            assert torch.equal(state[index][key], value), (index, key)
