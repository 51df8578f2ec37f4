"""Exact selection of the weights an update drops or grows.

Pure but for the generator it draws from: given the candidate positions of a layer, a
count and a score, the positions chosen, never more or fewer than asked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import full
from ..sampling import random_subset
from ..structure import Structure
from ..structure import select as structured_select
from ..warn import warn


def select(
    candidates: Tensor,
    n: int,
    score: Tensor | None,
    *,
    lowest: bool,
    generator: torch.Generator,
    where: str,
    first: Tensor | None = None,
    structure: Structure | None = None,
    targets: Tensor | None = None,
    kept: Tensor | None = None,
    regrow: bool = True,
) -> Tensor:
    """Bool tensor (shape of ``candidates``) marking ``n`` of the ``candidates``.

    Those in ``first`` go before any other, then the lowest (``lowest``) or highest
    ``score``; uniformly at random from ``generator`` when ``score`` is None. Non-finite
    scores rank last (dropped first, grown last), with a warning naming ``where`` (the
    scheduler, the layer and the step). A sharded ``score`` is gathered, so the choice is
    global over the shards. A ``structure`` selects inside its groups
    (:func:`sparse_param.structure.select`) so that every group ends at its ``targets``
    count; ``kept`` is the mask after pruning, for growth.
    """
    if score is not None:
        score = full(score)
    if structure is not None:
        return structured_select(
            structure, candidates, n, score, lowest=lowest, kept=kept, targets=targets,
            regrow=regrow, generator=generator,
        )  # fmt: skip
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    if first is not None:
        forced = (candidates & first).flatten().nonzero().squeeze(1)[:n]
        chosen[forced] = True
        candidates = candidates & ~first
        n -= forced.numel()
    if n > 0:
        index = candidates.flatten().nonzero().squeeze(1)
        if n > index.numel():
            raise AssertionError(f"{where}: asked to pick {n} of {index.numel()} positions")
        if score is None:
            pick = random_subset(index.numel(), n, generator).to(index.device)
        else:
            values = score.flatten()[index].float()
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                warn(f"{where}: {int((~finite).sum())} non-finite scores; they rank last",
                     RuntimeWarning)  # fmt: skip
                # -inf ranks last either way: dropped first, grown last.
                values = torch.where(finite, values, -torch.inf)
            pick = torch.topk(values, n, largest=not lowest, sorted=False).indices
        chosen[index[pick]] = True
    return chosen.view_as(candidates)
