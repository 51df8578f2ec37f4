"""``python -m sparse_param.export CKPT OUT [--ema]``: the plain weights of a sparse checkpoint.

The command line of :mod:`sparse_param.checkpoint.export`, which does the work."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from .checkpoint import SUFFIXES, load_checkpoint_file, plain_state_dict, save_plain


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sparse_param.export CKPT OUT [--ema]``: write the plain weights of a
    sparse checkpoint, for timm's ``validate.py --checkpoint OUT`` and
    ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=OUT))``."""
    parser = argparse.ArgumentParser(
        prog="python -m sparse_param.export",
        description="Convert a sparse checkpoint (timm .pth.tar or a state dict) into the "
        "plain state dict timm's validate.py and create_model load unmodified.",
    )
    parser.add_argument("checkpoint", help="sparse checkpoint: timm .pth.tar or a state dict")
    parser.add_argument("out", help=f"plain state dict to write ({', '.join(SUFFIXES)})")
    parser.add_argument(
        "--ema", action="store_true", help="convert the EMA weights ('state_dict_ema')"
    )
    args = parser.parse_args(argv)
    if Path(args.out).suffix not in SUFFIXES:
        parser.error(f"OUT {args.out}: name the file {' or '.join(SUFFIXES)}")
    try:
        checkpoint = load_checkpoint_file(args.checkpoint)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
        plain = plain_state_dict(checkpoint, ema=args.ema)
    except (OSError, ValueError, RuntimeError) as error:
        parser.error(f"CKPT {args.checkpoint}: {error}")
    save_plain(plain, args.out)
    print(f"wrote {args.out}: {len(plain)} tensors, plain timm layout")


if __name__ == "__main__":
    main()
