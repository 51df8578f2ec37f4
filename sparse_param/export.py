"""``python -m sparse_param.export CKPT OUT [--ema]``: the plain weights of a sparse checkpoint.

The command line of :mod:`sparse_param.checkpoint.export`, which does the work."""

from __future__ import annotations

import argparse
import os
import pickle
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
    check_out(parser, Path(args.out))
    if not Path(args.checkpoint).is_file():
        parser.error(f"CKPT {args.checkpoint}: No such file")
    try:
        checkpoint = load_checkpoint_file(args.checkpoint)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # torch's first sentence: the rest is advice about torch.load's own arguments
        first = str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
        parser.error(
            f"CKPT {args.checkpoint}: torch.load cannot read it ({first}); the file is "
            f"truncated or corrupted (an interrupted save or copy?) or not a torch "
            f"checkpoint: export from a complete copy"
        )
    try:
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
        plain = plain_state_dict(checkpoint, ema=args.ema)
    except (ValueError, RuntimeError) as error:
        parser.error(f"CKPT {args.checkpoint}: {error}")
    save_plain(plain, args.out)
    print(f"wrote {args.out}: {len(plain)} tensors, plain timm layout")


def check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Refuse an OUT that cannot be written before the checkpoint is read, as an
    argparse error rather than the writer's traceback at the end."""
    if out.suffix not in SUFFIXES:
        parser.error(f"OUT {out}: name the file {' or '.join(SUFFIXES)}")
    folder = out.parent
    if not folder.is_dir():
        parser.error(f"OUT {out}: {folder} is not an existing folder; create it first")
    if not os.access(folder, os.W_OK):
        parser.error(f"OUT {out}: the folder {folder} is not writable; choose another")
    if out.is_dir():
        parser.error(f"OUT {out}: is a folder; name the file to write")


if __name__ == "__main__":
    main()
