"""The papers' studies in miniature, one command each, on data that ships in packages.

    python -m sparse_param.study itop     --out DIR [--tiny|--full] [--seeds 0 1 2]
    python -m sparse_param.study scsdc    --out DIR [--tiny|--full] [--seeds 0 1 2]
    python -m sparse_param.study gradflow --out DIR [--tiny|--full] [--seeds 0 1 2]

Each writes ``results.md`` (tables of mean ± std over seeds, and a verdict per claim
with its numbers) and PNG plots into ``--out``. ``--tiny`` runs in seconds, the default
size in minutes on two CPU cores, ``--full`` in hours; ``--help`` lists what each size
trains.
"""

from . import gradflow, itop, scsdc

STUDIES = {"itop": itop, "scsdc": scsdc, "gradflow": gradflow}

__all__ = ["STUDIES", "gradflow", "itop", "scsdc"]
