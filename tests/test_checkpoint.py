"""Loading a state dict into a sparse model is checked before anything is copied: every
misuse is refused with the layer and the problem, and the model is left bit for bit as
it was, through ``model.load_state_dict``, ``sparse_param.load_state_dict``, a bigger
model holding the sparse one, a ``torch.compile`` wrapper and an EMA copy."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from timm.utils import ModelEmaV3
from torch import nn

import sparse_param as sp
from sparse_param import layer_table, sparse_layers, sparsify, summary

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ORIGINAL = "parametrizations.weight.original"
MASK = "parametrizations.weight.0.mask"
EVER = "parametrizations.weight.0.ever_active"


def net(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 4, 10),
        nn.Linear(10, 5),
    )


def sparse_net(seed: int, density: float = 0.3, width: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    model = sparsify(net(width), density, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in sparse_layers(model):  # an ever_active larger than the mask, as in training
        layer.ever_active.logical_or_(torch.rand(layer.mask.shape, generator=g) < 0.3)
    return model


def checkpoint(seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sparse_net(seed, **kwargs).state_dict().items()}


def allocations(model: nn.Module) -> list[int]:
    return [row["allocated"] for row in layer_table(model)]


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with its first True bit cleared."""
    out = mask.clone().flatten()
    out[int(out.nonzero()[0])] = False
    return out.view_as(mask)


# name: (corruption of the checkpoint, strict, words of the error)
MISUSES = {
    "float mask": (
        lambda s: s.update({"4." + MASK: s["4." + MASK].float()}),
        True,
        r"layer '4': mask must be a bool tensor, got a torch.float32",
    ),
    "uint8 mask": (
        lambda s: s.update({"0." + MASK: s["0." + MASK].to(torch.uint8)}),
        True,
        r"layer '0': mask must be a bool tensor, got a torch.uint8",
    ),
    "flat mask": (
        lambda s: s.update({"0." + MASK: s["0." + MASK].flatten()}),
        True,
        r"layer '0': mask has shape \(216,\), the weight \(8, 3, 3, 3\)",
    ),
    "all-False mask": (lambda s: s["5." + MASK].zero_(), True, r"layer '5': the mask is all False"),
    "ever_active misses the mask": (
        lambda s: s.update({"4." + EVER: first_true(s["4." + EVER] & s["4." + MASK])}),
        True,
        r"layer '4': ever_active misses \d+ active weights",
    ),
    "float ever_active": (
        lambda s: s.update({"5." + EVER: s["5." + EVER].double()}),
        True,
        r"layer '5': ever_active must be a bool tensor",
    ),
    "ever_active shaped wrong": (
        lambda s: s.update({"5." + EVER: s["5." + EVER].t()}),
        True,
        r"layer '5': ever_active has shape \(10, 5\)",
    ),
    "a sparse layer without its mask": (
        lambda s: s.pop("4." + MASK),
        False,
        r"layer '4': the checkpoint has .* but not \['4.param",
    ),
    "a missing mask (strict)": (
        lambda s: s.pop("4." + MASK),
        True,
        r"missing keys: '4.parametrizations.weight.0.mask'",
    ),
    "weight shaped wrong": (
        lambda s: s.update({"5." + ORIGINAL: torch.zeros(5, 11)}),
        True,
        r"5.parametrizations.weight.original: shape \(5, 11\) in the che",
    ),
    "integer weight": (
        lambda s: s.update({"5." + ORIGINAL: s["5." + ORIGINAL].long()}),
        False,
        r"5.parametrizations.weight.original: torch.int64 in the checkpoint",
    ),
    "bias shaped wrong": (
        lambda s: s.update({"4.bias": torch.zeros(11)}),
        False,
        r"4.bias: shape \(11,\) in the checkpoint, \(10,\) in the model",
    ),
    "not a tensor": (
        lambda s: s.update({"1.running_mean": [0.0] * 8}),
        False,
        r"1.running_mean: expected a tensor, got a list",
    ),
    "an unexpected key": (
        lambda s: s.update({"6.weight": torch.zeros(3)}),
        True,
        r"unexpected keys: '6.weight'",
    ),
}


def corrupt(name: str) -> tuple[dict[str, torch.Tensor], bool, str]:
    state = checkpoint(0)
    how, strict, words = MISUSES[name]
    how(state)
    return state, strict, words


@pytest.mark.parametrize("load", ["module", "helper"])
@pytest.mark.parametrize("name", list(MISUSES))
def test_a_bad_checkpoint_is_refused_and_nothing_is_copied(snapshot, assert_untouched, name, load):
    state, strict, words = corrupt(name)
    model = sparse_net(1, density=0.1)
    snap, allocated = snapshot(model), allocations(model)
    with pytest.raises(RuntimeError, match=words):
        if load == "module":
            model.load_state_dict(state, strict=strict)
        else:
            sp.load_state_dict(model, state, strict=strict)
    assert_untouched(model, snap)
    assert allocations(model) == allocated


def test_every_problem_is_listed_at_once():
    state = checkpoint(0)
    for name in ("float mask", "all-False mask", "bias shaped wrong"):
        MISUSES[name][0](state)
    with pytest.raises(RuntimeError) as error:
        sparse_net(1).load_state_dict(state)
    lines = str(error.value).splitlines()
    assert "no tensor of it was copied" in lines[0]
    assert len(lines) == 4, lines


def test_a_checkpoint_of_another_architecture_loads_nothing(snapshot, assert_untouched):
    wider = checkpoint(0, width=16)  # same keys, some shapes differ
    model = sparse_net(1)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"0.parametrizations.weight.original: shape"):
        model.load_state_dict(wider)
    assert_untouched(model, snap)  # torch alone would have copied the matching layer 5

    deeper = nn.Sequential(*net(), nn.Linear(5, 5))
    sparsify(deeper, 0.3)
    with pytest.raises(RuntimeError, match="unexpected keys: '6.bias', '6.parametrizations"):
        model.load_state_dict(deeper.state_dict())
    assert_untouched(model, snap)


def test_a_dense_checkpoint_for_a_sparse_model_names_the_fix(snapshot, assert_untouched):
    model = sparse_net(1)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"plain \(dense\) weights .* before sparsify"):
        model.load_state_dict(net().state_dict())
    assert_untouched(model, snap)


def test_a_nested_sparse_model_is_checked_with_its_prefix(snapshot, assert_untouched):
    def bigger(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        outer = nn.Module()
        outer.stem = nn.Linear(3, 3)
        outer.body = sparse_net(seed)  # sparsified alone, then nested
        return outer

    state = {k: v.clone() for k, v in bigger(0).state_dict().items()}
    state["body.5." + MASK].zero_()
    model = bigger(1)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="layer 'body.5': the mask is all False"):
        sp.load_state_dict(model, state)
    assert_untouched(model, snap)  # the helper checks the whole model first
    body = snapshot(model.body)
    with pytest.raises(RuntimeError, match="layer 'body.5': the mask is all False"):
        model.load_state_dict(state)
    assert_untouched(model.body, body)  # plain torch: the sparse module loads nothing

    # A sparse layer loading on its own is checked too (keys relative to it).
    layer = {k[len("body.5.") :]: v for k, v in state.items() if k.startswith("body.5.")}
    layer[MASK] = layer[MASK].float()
    alone = snapshot(model.body[5])
    with pytest.raises(RuntimeError, match=r"layer '\(the module loading\)': mask"):
        model.body[5].load_state_dict(layer)
    assert_untouched(model.body[5], alone)


def test_wrappers_and_ema_copies_refuse_too(snapshot, assert_untouched):
    state = checkpoint(0)
    state["0." + MASK] = state["0." + MASK].float()
    model = sparse_net(1)
    ema = ModelEmaV3(model, decay=0.9)  # a deepcopy of the sparse model
    snap, ema_snap = snapshot(model), snapshot(ema.module)
    with pytest.raises(RuntimeError, match="layer '0': mask must be a bool tensor"):
        ema.module.load_state_dict(state)
    with pytest.raises(RuntimeError, match="layer 'module.0': mask must be a bool tensor"):
        ema.load_state_dict({"module." + k: v for k, v in state.items()})
    compiled = torch.compile(model)  # a wrapper; nothing is compiled before a forward
    with pytest.raises(RuntimeError, match="layer '_orig_mod.0': mask must be a bool"):
        compiled.load_state_dict({"_orig_mod." + k: v for k, v in state.items()})
    assert_untouched(model, snap)
    assert_untouched(ema.module, ema_snap)


# ------------------------------------------------------------------ loads that work


def test_loading_masks_of_another_density_records_their_allocation():
    dense_ish = sparse_net(0, density=0.5)
    model = sparse_net(1, density=0.05)
    model.load_state_dict(dense_ish.state_dict())
    assert allocations(model) == allocations(dense_ish)
    assert [row["allocated"] for row in layer_table(model)] == [
        layer.active for layer in sparse_layers(model)
    ]
    assert summary(model) == summary(dense_ish)


def test_valid_non_strict_and_legacy_loads_still_work(check_invariants):
    source, model = sparse_net(0), sparse_net(1)
    state = source.state_dict()
    # Partial, non-strict: the BatchNorm only, or one sparse layer whole.
    part = {k: v for k, v in state.items() if k.startswith(("1.", "5."))}
    result = model.load_state_dict(part, strict=False)
    assert "0." + MASK in result.missing_keys
    assert torch.equal(
        model[5].parametrizations.weight[0].mask, source[5].parametrizations.weight[0].mask
    )
    assert torch.equal(model[1].running_var, source[1].running_var)
    # A state dict without metadata or num_batches_tracked (converted checkpoints):
    # BatchNorm fills it in, as torch does without sparse_param.
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(legacy)
    check_invariants(model)
    for a, b in zip(model.state_dict().values(), state.values()):
        assert torch.equal(a, b)


def test_strict_reaches_the_check_without_reading_the_stack(snapshot, assert_untouched):
    """torch hands load pre-hooks strict=True whatever the caller asked: the sparsified
    module's own load_state_dict (an EMA copy's too) and sp.load_state_dict pass the
    caller's on; a load that starts on a wrapper is checked as strict and names the fix."""
    source = sparse_net(0)
    part = {k: v for k, v in source.state_dict().items() if k.startswith(("1.", "5."))}
    model = sparse_net(1)
    mask = model[5].parametrizations.weight[0].mask.clone()
    ema = copy.deepcopy(model)
    ema.load_state_dict(part, strict=False)  # the copy's method loads the copy
    wanted = source[5].parametrizations.weight[0].mask
    assert torch.equal(ema[5].parametrizations.weight[0].mask, wanted)
    assert torch.equal(model[5].parametrizations.weight[0].mask, mask)
    assert not torch.equal(mask, wanted)

    compiled = torch.compile(model)  # a wrapper; nothing is compiled before a forward
    wrapped = {"_orig_mod." + k: v for k, v in part.items()}
    snap = snapshot(model)
    fix = r"sparse_param\.load_state_dict\(wrapper, state_dict, strict=False\)"
    with pytest.raises(RuntimeError, match=rf"(?s)missing keys: .*{fix}"):
        compiled.load_state_dict(wrapped, strict=False)
    assert_untouched(model, snap)
    sp.load_state_dict(compiled, wrapped, strict=False)
    assert torch.equal(model[5].parametrizations.weight[0].mask, wanted)


def test_a_module_with_its_own_loading_still_loads_its_old_keys():
    def rename(state_dict, prefix, *args):  # a user's pre-hook for an old key name
        if prefix + "scale_old" in state_dict:
            state_dict[prefix + "scale"] = state_dict.pop(prefix + "scale_old")

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        layer = nn.Module()
        layer.register_parameter("scale", nn.Parameter(torch.ones(3)))
        layer._register_load_state_dict_pre_hook(rename)
        return sparsify(nn.Sequential(nn.Linear(3, 3), layer), 0.5)

    state = dict(model().state_dict())
    state["1.scale_old"] = state.pop("1.scale") * 2
    loaded = model()
    loaded.load_state_dict(state)
    assert torch.equal(loaded[1].scale, torch.full((3,), 2.0))


def test_a_finalized_model_loads_plain_checkpoints_as_torch_does():
    model = sp.finalize(sparse_net(1))
    plain = net().state_dict()
    model.load_state_dict(plain)
    assert model.load_state_dict({"5.bias": plain["5.bias"]}, strict=False).missing_keys


# --------------------------------------------------------- random corruption (property)


def _dtype(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor of another kind (bool / integer / floating-point)."""
    return value.to(torch.int32) if value.dtype.is_floating_point else value.float()


def _shape(value: torch.Tensor) -> torch.Tensor:
    return value.flatten()[:-1] if value.numel() > 1 else value.unsqueeze(0).repeat(2)


CORRUPTIONS = {
    "dtype": _dtype,
    "shape": _shape,
    "extra dim": lambda v: v.unsqueeze(0).repeat(2, *[1] * v.dim()),
    "not a tensor": lambda v: v.tolist(),
    "missing": None,
}


@given(
    st.integers(0, 2),  # sparse layer
    st.sampled_from([ORIGINAL, MASK, EVER]),
    st.sampled_from([*CORRUPTIONS, "all False", "ever_active loses a bit"]),
    st.booleans(),  # strict
    st.floats(0.05, 0.9),  # density of the model loading
)
def test_any_corruption_of_a_sparse_entry_is_refused_untouched(
    snapshot, assert_untouched, layer, entry, how, strict, density
):
    state = checkpoint(0)
    at = ["0.", "4.", "5."][layer]
    key = at + entry
    if how == "all False":
        state[at + MASK].zero_()
    elif how == "ever_active loses a bit":
        state[at + EVER] = first_true(state[at + EVER] & state[at + MASK])
    elif how == "missing":
        del state[key]
    else:
        state[key] = CORRUPTIONS[how](state[key])
    model = sparse_net(1, density)
    snap, allocated = snapshot(model), allocations(model)
    name = at[:-1]
    with pytest.raises(RuntimeError, match=rf"(layer '{name}'|{name}\.parametrizations)"):
        model.load_state_dict(state, strict=strict)
    assert_untouched(model, snap)
    assert allocations(model) == allocated
    # and the uncorrupted checkpoint loads
    model.load_state_dict(checkpoint(0))
    assert allocations(model) == allocations(sparse_net(0))


DENSE_KEYS = [
    "0.bias",
    "1.weight",
    "1.bias",
    "1.running_mean",
    "1.running_var",
    "1.num_batches_tracked",
    "4.bias",
    "5.bias",
]


@given(
    st.sampled_from(DENSE_KEYS),
    st.sampled_from(list(CORRUPTIONS)),
    st.booleans(),  # strict
)
def test_any_corruption_of_another_entry_is_refused_untouched(
    snapshot, assert_untouched, key, how, strict
):
    if how == "missing" and (not strict or key == "1.num_batches_tracked"):
        return  # a partial load, or one BatchNorm completes as torch does: both valid
    state = checkpoint(0)
    if how == "missing":
        del state[key]
    else:
        state[key] = CORRUPTIONS[how](state[key])
    model = sparse_net(1)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        model.load_state_dict(state, strict=strict)
    assert_untouched(model, snap)


def test_a_valid_load_after_a_refused_one_is_exact(check_invariants):
    model = sparse_net(1)
    state = checkpoint(0)
    bad = dict(state)
    bad["0." + MASK] = bad["0." + MASK].float()
    with pytest.raises(RuntimeError):
        model.load_state_dict(bad)
    model.load_state_dict(state)
    check_invariants(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert copy.deepcopy(model).load_state_dict(state) is not None


def test_a_load_checks_each_layer_once_and_a_layer_alone_still_checks(monkeypatch):
    """The root's hook checks the whole subtree; each sparse layer's own hook, which
    torch runs next on the same tensors, does not check them again. Loading a layer on
    its own, after that, is checked in full."""
    from sparse_param.checkpoint import checks as ckpt

    calls = []
    check = ckpt._check
    monkeypatch.setattr(ckpt, "_check", lambda *a: calls.append(a[3]) or check(*a))
    model = sparse_net(1)
    model.load_state_dict(checkpoint(0))
    assert calls == [""]  # the root only: no second pass per sparse layer
    layer = model[0]
    state = {k[len("0.") :]: v for k, v in checkpoint(0).items() if k.startswith("0.")}
    layer.load_state_dict(state)
    assert calls == ["", ""]
    state[MASK] = torch.zeros_like(state[MASK])
    with pytest.raises(RuntimeError, match="keeps no weight|all False|no active"):
        layer.load_state_dict(state)


# ------------------------------------------------ issue 19: inputs a user cannot act on

STATE_DICT_READERS = {
    "load_state_dict": lambda m, s: sp.load_state_dict(m, s),
    "check_state_dict": lambda m, s: sp.checkpoint.check_state_dict(m, s),
    "dense_state_dict": lambda m, s: sp.dense_state_dict(s),
    "is_sparse_state_dict": lambda m, s: sp.is_sparse_state_dict(s),
}


@pytest.mark.parametrize("given, words", [(None, "got None"), ([1, 2], "got a list")])
@pytest.mark.parametrize("name", list(STATE_DICT_READERS))
def test_a_state_dict_that_is_not_a_mapping_is_refused_with_the_fix(
    name, given, words, snapshot, assert_untouched
):
    model = sparse_net(1)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=rf"^{name}: state_dict must be a mapping, {words}; "
                                        rf"pass model.state_dict\(\)"):  # fmt: skip
        STATE_DICT_READERS[name](model, given)
    assert_untouched(model, snap)


@pytest.mark.parametrize("load", ["sparse_param", "torch"])
def test_a_bool_mask_with_bytes_other_than_one_loads_as_its_truth_values(load):
    """``uint8_tensor.view(torch.bool)`` holds 0xFF for True: torch reads it as True, so
    it loads as the mask it means (not as "ever_active misses ... active weights"), and
    the buffers loaded hold bytes 0 and 1 only."""
    saved = sparse_net(0)
    state = checkpoint(0)
    for key in [k for k in state if k.endswith(MASK)]:
        state[key] = (state[key].view(torch.uint8) * 255).view(torch.bool)
    model = sparse_net(1)
    if load == "sparse_param":
        sp.load_state_dict(model, state)
    else:
        model.load_state_dict(state)
    for key, value in saved.state_dict().items():
        loaded = model.state_dict()[key]
        if value.dtype == torch.bool:
            assert torch.equal(loaded.view(torch.uint8), value.view(torch.uint8)), key
        else:
            assert torch.equal(loaded, value), key
    assert allocations(model) == allocations(saved)
    assert sp.itop_rate(model) == sp.itop_rate(saved)
