"""What an update leaves behind: its record, and the JSON-lines log of the run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .. import distributed
from ..metrics import density, egf_at_update, itop_rate

if TYPE_CHECKING:
    from ..layers import SparseLayer


def update_record(
    model: nn.Module,
    layers: Sequence[SparseLayer],
    step: int,
    fraction: float,
    pruned: Sequence[int],
    grown: Sequence[int],
) -> dict[str, Any]:
    """The record of the update at ``step``: drop fraction, per-layer counts (by layer
    name), the model's density and R_s after it, and the EGF of the changed weights."""
    return {
        "step": step,
        "drop_fraction": fraction,
        "pruned": {layer.name: n for layer, n in zip(layers, pruned)},
        "grown": {layer.name: n for layer, n in zip(layers, grown)},
        "density": density(model),
        "itop_rate": itop_rate(model),
        "egf": egf_at_update(layers, pruned, grown),
    }


def check_log_path(owner: str, path: str | os.PathLike[str] | None) -> Path | None:
    """``path`` as a Path whose folder exists (None passes)."""
    if path is None:
        return None
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(
            f"{owner}: log_path {str(path)!r}: folder {str(path.parent)!r} does not exist; "
            f"create it first"
        )
    return path


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one JSON line. Every rank holds the same record:
    only rank 0 writes."""
    if distributed.rank() != 0:
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """JSON form of what a record may hold besides plain values (tensors, numpy scalars)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"update record value {value!r} is not JSON serializable")
