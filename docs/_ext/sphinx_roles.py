"""Griffe extension: Sphinx roles in fastbn's docstrings become mkdocstrings cross-references.

fastbn's docstrings are NumPy style and use Sphinx roles (``:func:`batch_norm_backward```,
``:meth:`BatchNorm.forward```, ``:class:`~fastbn.distributed.Communicator```).  mkdocstrings
would print those roles literally.  This extension rewrites each one whose target is an
object of the package into an autorefs link (``[`batch_norm_backward`][fastbn.functional.
batch_norm_backward]``), resolved the way Sphinx resolves it: the full path, then relative
to the enclosing class, module and package.  Targets outside the package (``torch.nn``,
builtins) become plain code.  A link whose target page is missing fails ``mkdocs build
--strict``, so a docstring that names a function that no longer exists turns the build red.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const):`(~?)([\w.]+)(\(\))?`")


def _walk(obj, seen):
    if obj.path in seen:
        return
    seen[obj.path] = obj
    for member in obj.members.values():
        if member.is_alias:
            seen.setdefault(member.path, member)
            continue
        _walk(member, seen)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        objects: dict = {}
        _walk(pkg, objects)
        for obj in list(objects.values()):
            if obj.is_alias or obj.docstring is None:
                continue
            obj.docstring.value = ROLE.sub(lambda m: self._link(m, obj, objects),
                                           obj.docstring.value)

    @staticmethod
    def _link(match, obj, objects) -> str:
        tilde, target, call = match.groups()
        shown = (target.rsplit(".", 1)[-1] if tilde else target) + (call or "")
        scopes = []
        scope = obj if obj.is_class or obj.is_module else obj.parent
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        for candidate in [target] + [f"{s}.{target}" for s in scopes]:
            if candidate in objects:
                return f"[`{shown}`][{candidate}]"
        return f"`{shown}`"
