"""The papers' studies in miniature, one command each, on data that ships in packages.

    python -m sparse_param.study itop     --out DIR [--full] [--seeds 0 1 2]
    python -m sparse_param.study scsdc    --out DIR [--full] [--seeds 0 1 2]
    python -m sparse_param.study gradflow --out DIR [--full] [--seeds 0 1 2]

Each writes ``results.md`` (tables of mean ± std over seeds, and a verdict per claim
with its numbers) and PNG plots into ``--out``. The default size finishes in minutes
on two CPU cores; ``--full`` is the larger setting.
"""

from . import gradflow, itop, scsdc

STUDIES = {"itop": itop, "scsdc": scsdc, "gradflow": gradflow}

__all__ = ["STUDIES", "gradflow", "itop", "scsdc"]
