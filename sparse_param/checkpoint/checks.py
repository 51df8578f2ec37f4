"""Checking a state dict against a sparse model before anything is copied.

``torch.nn.Module.load_state_dict`` copies every tensor it can and raises about the rest
afterwards, so a checkpoint of another architecture half-loads, and it casts whatever it
is given into a buffer, so a float or wrongly shaped mask, an all-False mask or an
``ever_active`` that misses active weights load silently. ``sparsify`` registers
:func:`check_before_load` as a load pre-hook on the module it sparsified and on every
sparse layer: the root's hook runs before any tensor of its subtree is copied and sees
the whole of it, so a load is all-or-nothing whichever call made it
(``model.load_state_dict``, :func:`sparse_param.load_state_dict`, a DDP or
``torch.compile`` wrapper, a deep copy such as an EMA model).

Which ``strict`` the hook checks with: torch hands every load pre-hook ``strict=True``
whatever the caller asked for (and compares the key sets only after copying), so the
caller's flag is asked for explicitly. ``sparsify`` gives the module it sparsified and
each sparse layer a ``load_state_dict`` that records its ``strict`` for the hooks
(:func:`asking_strict`), and :func:`sparse_param.load_state_dict` records its own; a
deep copy (an EMA model) keeps them. A load that starts elsewhere (on a DDP or
``torch.compile`` wrapper, an EMA wrapper, a bigger model holding the sparse one) is
checked as ``strict=True``, torch's default: its missing or unexpected keys are refused
before anything is copied, and the error names the way to a non-strict load through a
wrapper, ``sparse_param.load_state_dict(wrapper, state_dict, strict=False)``. Every other
check runs whatever ``strict`` is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..arguments import check_mapping, check_model
from ..mask import SparseMask, canonical_mask
from ..structure import checkpoint_problems
from .keys import EVER, MASK, SPARSE_ENTRIES, STRUCTURE

_MAX_LISTED = 20  # problems listed in one error message
# The strict of the load running now, where its caller recorded it (None: not recorded).
_STRICT: ContextVar[bool | None] = ContextVar("sparse_param_load_strict", default=None)
STATE_DICT_FIX = (  # where a state dict comes from, for errors given something else
    "pass model.state_dict(), or a loaded checkpoint's state dict "
    "(torch.load(path)['state_dict'] for a timm checkpoint)"
)
_WRAPPER_HINT = (
    "a load that does not start on the sparsified module is checked as strict=True: for a "
    "non-strict load through a wrapper, call "
    "sparse_param.load_state_dict(wrapper, state_dict, strict=False)"
)


class _Expected:
    """What loading ``root`` copies into, keyed as in its state dict under ``prefix``:
    ``tensors`` (key to tensor; None for extra state), ``modules`` (key prefix to
    module) and ``sparse`` (a sparse layer's key prefix to its :class:`SparseMask`)."""

    def __init__(self, root: nn.Module, prefix: str) -> None:
        self.tensors: dict[str, Tensor | None] = {}
        self.modules: dict[str, nn.Module] = {}  # key prefix ("a.b." or prefix) to module
        self.sparse: dict[str, SparseMask] = {}
        for name, module in root.named_modules(remove_duplicate=False):
            at = prefix + name + "." if name else prefix
            self.modules[at] = module
            # The same locals nn.Module._load_from_state_dict copies into.
            for key, value in module._parameters.items():
                if value is not None:
                    self.tensors[at + key] = value
            for key, value in module._buffers.items():
                if value is not None and key not in module._non_persistent_buffers_set:
                    self.tensors[at + key] = value
            if type(module).set_extra_state is not nn.Module.set_extra_state:
                self.tensors[at + "_extra_state"] = None
            if _has_sparse_weight(module):
                self.sparse[at] = module.parametrizations.weight[0]

    def owner(self, key: str) -> nn.Module | None:
        """The module a key belongs to: the deepest module whose prefix it starts with."""
        parts = key.split(".")
        for i in range(len(parts) - 1, -1, -1):
            module = self.modules.get(".".join(parts[:i]) + "." if i else "")
            if module is not None:
                return module
        return None


def _custom_loading(module: nn.Module) -> bool:
    """Whether ``module`` loads its entries in a way of its own (timm's
    FrozenBatchNormAct2d drops ``num_batches_tracked``; InstanceNorm checks running
    stats; a user's pre-hook may rename keys), so only torch can tell which of its keys
    are missing or unexpected. BatchNorm's way is known: see :func:`_filled_in`."""
    hooks = _pre_hooks(module)
    loader = type(module)._load_from_state_dict
    own = loader not in (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
    return own or any(hook is not check_before_load for hook in hooks)


def _filled_in(expected: _Expected, state_dict: Mapping[str, Any]) -> set[str]:
    """The ``num_batches_tracked`` keys BatchNorm fills in when a checkpoint lacks them:
    those of modules saved before that buffer existed (metadata version < 2) or with
    no metadata at all (a state dict rebuilt as a plain dict)."""
    metadata = getattr(state_dict, "_metadata", None)
    keys = set()
    for at, module in expected.modules.items():
        if isinstance(module, _NormBase) and module.track_running_stats:
            version = None if metadata is None else metadata.get(at[:-1], {}).get("version")
            if version is None or version < 2:
                keys.add(at + "num_batches_tracked")
    return keys


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _check_tensor(key: str, value: Any, target: Tensor) -> str | None:
    """What is wrong with loading ``value`` into ``target`` (None if nothing), following
    torch's own rules: a tensor, the same shape (a 1-element 1-D tensor loads into a 0-D
    one; lazy parameters take any shape), and a dtype torch would cast without losing its
    meaning (same kind: bool, integer, floating-point, complex)."""
    if not torch.overrides.is_tensor_like(value):
        return f"{key}: expected a tensor, got {_describe(value)}"
    if not nn.parameter.is_lazy(target):
        shape = value.shape
        if target.dim() == 0 and shape == (1,):
            shape = torch.Size()
        if shape != target.shape:
            checkpoint, model = tuple(value.shape), tuple(target.shape)
            return f"{key}: shape {checkpoint} in the checkpoint, {model} in the model"
    if _kind(value.dtype) != _kind(target.dtype):
        return f"{key}: {value.dtype} in the checkpoint, {target.dtype} in the model"
    return None


def _canonical(value: Any) -> Any:
    """A bool tensor made canonical (:func:`~sparse_param.mask.canonical_mask`) rather
    than refused; anything else as it is, for the checks to report."""
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        return canonical_mask(value)
    return value


def _check_sparse_layer(name: str, mask: Any, ever: Any, shape: torch.Size) -> list[str]:
    """What is wrong with one sparse layer's (canonical) mask and ever_active."""
    problems = []
    for what, value in (("mask", mask), ("ever_active", ever)):
        if not isinstance(value, Tensor) or value.dtype != torch.bool:
            problems.append(f"layer {name!r}: {what} must be a bool tensor, got {_describe(value)}")
        elif value.shape != shape:
            problems.append(
                f"layer {name!r}: {what} has shape {tuple(value.shape)}, the weight {tuple(shape)}"
            )
    if problems:
        return problems
    # uint8 views: bool reductions on CPU take an unvectorized path (~50x slower).
    active, kept = mask.view(torch.uint8), ever.to(mask.device).view(torch.uint8)
    if not bool(active.any()):
        problems.append(f"layer {name!r}: the mask is all False (every layer keeps >= 1 weight)")
    missed = active & ~kept  # 1 where active and not ever active
    if bool(missed.any()):
        problems.append(
            f"layer {name!r}: ever_active misses {int(missed.count_nonzero())} active weights "
            f"of the mask (ever_active must contain the mask)"
        )
    return problems


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool | None = True, prefix: str = ""
) -> dict[SparseMask, int]:
    """Check everything ``model.load_state_dict(state_dict, strict)`` would copy, before
    anything is: raise listing every problem, or return what to record.

    Checked, for the keys under ``prefix``: with ``strict``, that the key sets agree
    (a BatchNorm's ``num_batches_tracked`` may be missing where torch fills it in; the
    keys of modules that load in a way of their own are left to torch); that each entry
    is a tensor of the model's shape and dtype kind; and for every sparse layer, that
    its stored weight, ``mask`` and ``ever_active`` come together (or not at all), that
    both buffers are bool (any non-zero byte read as True) and shaped like the weight,
    that the mask keeps at least one weight, that ``ever_active`` contains the mask, and
    that a structured layer's mask keeps its structure
    (:func:`~sparse_param.structure.checkpoint_problems`). Values off the mask are
    allowed (loading zeroes them).

    Args:
        model: the module about to load (a wrapper or a bigger model is fine).
        state_dict: the checkpoint's state dict (keys as ``model.state_dict()`` gives).
        strict: as in ``load_state_dict``; None skips the key-set comparison.
        prefix: the key prefix of ``model`` in ``state_dict``.

    Returns:
        The active count of each loaded mask, by its :class:`SparseMask` (what its
        ``allocated`` becomes after the load).

    Raises:
        RuntimeError: one line per problem, naming the key or layer and what is wrong.
    """
    check_model("check_state_dict", model)
    check_mapping("check_state_dict", "state_dict", state_dict, STATE_DICT_FIX)
    return _check(model, state_dict, strict, prefix).loaded


def _check(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool | None,
    prefix: str,
    key_hint: str | None = None,
) -> _Checked:
    """:func:`check_state_dict`, also returning what it expected and the canonical
    masks; ``key_hint`` is added to the problems when the key sets differ."""
    expected = _Expected(model, prefix)
    given = [key for key in state_dict if key.startswith(prefix)]
    problems: list[str] = []
    if strict:
        lenient = {id(m) for m in expected.modules.values() if _custom_loading(m)}
        filled = _filled_in(expected, state_dict)
        missing = [
            k
            for k in expected.tensors
            if k not in state_dict and k not in filled and id(expected.owner(k)) not in lenient
        ]
        unexpected = [
            k for k in given if k not in expected.tensors and id(expected.owner(k)) not in lenient
        ]
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        if key_hint and (missing or unexpected):
            problems.append(key_hint)
        problems += _dense_checkpoint_hint(expected, unexpected)
    sparse_keys = {at + end for at in expected.sparse for end in (MASK, EVER)}
    for key, target in expected.tensors.items():
        if key in state_dict and target is not None and key not in sparse_keys:
            problem = _check_tensor(key, state_dict[key], target)
            if problem:
                problems.append(problem)
    loaded: dict[SparseMask, int] = {}
    canonical: dict[str, Tensor] = {}
    for at, parametrization in expected.sparse.items():
        keys = [at + end for end in SPARSE_ENTRIES]
        present = [key in state_dict for key in keys]
        if not any(present):
            continue  # a missing layer: reported above when strict
        if not all(present):
            have = [k for k, p in zip(keys, present) if p]
            lack = [k for k, p in zip(keys, present) if not p]
            problems.append(
                f"layer {at[:-1]!r}: the checkpoint has {have} but not {lack}; a sparse layer "
                f"loads its weight, mask and ever_active together"
            )
            continue
        name = at[:-1] or "(the module loading)"
        mask, ever = _canonical(state_dict[at + MASK]), _canonical(state_dict[at + EVER])
        layer_problems = _check_sparse_layer(name, mask, ever, parametrization.mask.shape)
        if not layer_problems:  # a structured layer's mask must keep its structure
            code = state_dict.get(at + STRUCTURE)
            layer_problems = checkpoint_problems(name, parametrization, mask, code)
        problems += layer_problems
        if not layer_problems:
            loaded[parametrization] = int(mask.count_nonzero())
            canonical[at + MASK], canonical[at + EVER] = mask, ever
    if problems:
        shown = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            shown.append(f"... and {len(problems) - _MAX_LISTED} more")
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}; no tensor of it was "
            f"copied:" + "".join(f"\n\t{p}" for p in shown)
        )
    return _Checked(loaded, expected, canonical)


class _Checked(NamedTuple):
    loaded: dict[SparseMask, int]  # the active count of each loaded mask
    expected: _Expected
    canonical: dict[str, Tensor]  # each sparse layer's mask and ever_active, bytes 0 or 1


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _dense_checkpoint_hint(expected: _Expected, unexpected: list[str]) -> list[str]:
    """Name the fix when the checkpoint holds plain weights where the model is sparse."""
    plain = [at + "weight" for at in expected.sparse if at + "weight" in unexpected]
    if not plain:
        return []
    return [
        f"the checkpoint holds plain (dense) weights of the sparse layers ({_listed(plain, 3)}): "
        f"load it into the model before sparsify(model, ...), or load a checkpoint saved "
        f"from a sparsified model"
    ]


def check_before_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook (``register_load_state_dict_pre_hook``) of a sparsified module and
    of each sparse layer: :func:`check_state_dict` on the entries of its subtree, then
    put each sparse layer's canonical mask and ever_active (bytes 0 or 1) in
    ``state_dict`` for torch to copy, and record each loaded mask's active count as its
    ``allocated``.

    A sparse layer whose entries an enclosing module's hook has just checked (torch runs
    the root's hook first, then each child's, on the same tensors) is not checked again.
    ``strict`` is torch's constant True: the caller's is read as the module docstring says.
    """
    if not any(isinstance(m, SparseMask) for m in module.modules()):
        return  # finalized: a plain model loads as torch loads it
    mine = _layer_entries(state_dict, prefix) if _has_sparse_weight(module) else None
    if mine is not None and module.parametrizations.weight[0].consume_checked(mine):
        return
    asked = _STRICT.get()
    hint = _WRAPPER_HINT if asked is None else None
    loaded, expected, canonical = _check(module, state_dict, asked is not False, prefix, hint)
    state_dict.update(canonical)  # what torch copies next, and what each layer's hook sees
    for at, parametrization in expected.sparse.items():
        if parametrization in loaded:
            parametrization.allocated = loaded[parametrization]
            if at != prefix:  # for its own hook, which runs next
                parametrization.mark_checked(_layer_entries(state_dict, at))


def _layer_entries(state_dict: Mapping[str, Any], at: str) -> tuple[Any, ...] | None:
    """A sparse layer's stored weight, mask and ever_active in ``state_dict``."""
    entries = tuple(state_dict.get(at + end) for end in SPARSE_ENTRIES)
    return entries if all(isinstance(e, Tensor) for e in entries) else None


@contextlib.contextmanager
def asking_strict(strict: bool) -> Iterator[None]:
    """Within it, :func:`check_before_load` checks the loads it sees with ``strict``."""
    token = _STRICT.set(bool(strict))
    try:
        yield
    finally:
        _STRICT.reset(token)


class _StrictRecorded:
    """A sparsified module's ``load_state_dict``: its class's, with ``strict`` recorded
    for the hooks. An attribute of the module, which a deep copy (an EMA model) or a
    pickle round trip points at the copy."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, state_dict: Mapping[str, Any], strict: bool = True, *args, **kwargs):
        with asking_strict(strict):
            return type(self.module).load_state_dict(
                self.module, state_dict, strict, *args, **kwargs
            )


def install(model: nn.Module) -> None:
    """Register :func:`check_before_load` on ``model`` and on each of its sparse layers
    (once each), and give each a ``load_state_dict`` that records its ``strict``."""
    modules = [model] + [m for m in model.modules() if _has_sparse_weight(m)]
    for module in dict.fromkeys(modules):
        if check_before_load not in _pre_hooks(module):
            module.register_load_state_dict_pre_hook(check_before_load)
        module.load_state_dict = _StrictRecorded(module)


def _pre_hooks(module: nn.Module) -> list[Any]:
    """The load pre-hooks of ``module`` as registered (torch wraps some in a partial)."""
    return [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]


def _has_sparse_weight(module: nn.Module) -> bool:
    weight = getattr(getattr(module, "parametrizations", None), "weight", None)
    return weight is not None and isinstance(weight[0], SparseMask)
