"""The state-dict keys of a sparse layer, relative to the layer's own prefix."""

from __future__ import annotations

ORIGINAL = "parametrizations.weight.original"  # the stored weight (values off the mask too)
MASK = "parametrizations.weight.0.mask"
EVER = "parametrizations.weight.0.ever_active"
STRUCTURE = "parametrizations.weight.0.structure"  # structured masks only
SPARSE_ENTRIES = (ORIGINAL, MASK, EVER)  # a sparse layer loads these together


def layer_prefix(key: str, suffix: str) -> str | None:
    """``key`` without ``suffix``: the layer's prefix (``"layer."``, or ``""`` for a
    sparsified root module), or None when ``key`` is not a ``suffix`` entry."""
    if key == suffix:
        return ""
    if key.endswith("." + suffix):
        return key[: -len(suffix)]
    return None
