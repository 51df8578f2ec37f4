"""Which scheduler is attached to an optimizer or a sparse layer: at most one each.

Keys (an optimizer, each sparse layer's SparseMask) are held weakly, so a dropped
optimizer or model frees its entry; values are weak references too, so the registry
keeps nothing alive. :func:`sparse_param.attached_scheduler` is the public lookup.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

_ATTACHED: weakref.WeakKeyDictionary[object, weakref.ref[object]] = weakref.WeakKeyDictionary()


def lookup(keys: Iterable[object]) -> object | None:
    """The scheduler attached to the first of ``keys`` that has one; None if none has."""
    for key in keys:
        ref = _ATTACHED.get(key)
        if ref is not None and ref() is not None:
            return ref()
    return None


def attach(scheduler: object, keys: Iterable[object]) -> None:
    """Record ``scheduler`` as the one attached to each of ``keys``."""
    for key in keys:
        _ATTACHED[key] = weakref.ref(scheduler)


def detach(scheduler: object, keys: Iterable[object]) -> None:
    """Forget ``scheduler`` for each of ``keys`` it is attached to."""
    for key in keys:
        ref = _ATTACHED.get(key)
        if ref is not None and ref() is scheduler:
            del _ATTACHED[key]
