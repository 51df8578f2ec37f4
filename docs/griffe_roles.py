"""Griffe extension for the API reference: Sphinx roles in docstrings as inline code.

The docstrings cross-reference with Sphinx roles (``:class:`~sparse_param.SparseMask```),
which Markdown would print literally. Each role becomes inline code of the name it names
(the last component with ``~``, as Sphinx shows it); plain code rather than a link, so a
reference to an object the site does not render never breaks the strict build.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite every docstring's Sphinx roles as inline code, once per object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_as_code, obj.docstring.value)
