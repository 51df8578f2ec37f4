"""Warnings that point at the user's line, however deep inside torch they are raised."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# Frames in these folders are never the user's: this package, and torch (whose
# optimizer runs the scheduler's step hook, and whose autograd runs the mask's hooks).
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn`, attributed to the innermost frame outside sparse_param and
    torch (the user's ``optimizer.step()``, not torch's hook runner); to the caller
    when every frame is internal."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: who called this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
