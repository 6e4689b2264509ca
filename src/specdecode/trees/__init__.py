"""Tree shapes, one file each, looked up by name (`chain` is the drafters' own single path)."""

from typing import Any

from specdecode.errors import SpecDecodeError
from specdecode.trees.base import Expander, TreeShape
from specdecode.trees.delayed import DelayedTree
from specdecode.trees.dynamic import DynamicTree
from specdecode.trees.iid import IidTree
from specdecode.trees.static import StaticTree
from specdecode.trees.without_replacement import WithoutReplacementTree

TREE_SHAPES: dict[str, type[TreeShape]] = {
    cls.name: cls for cls in (StaticTree, DynamicTree, IidTree, WithoutReplacementTree, DelayedTree)
}
CHAIN = "chain"


def make_tree_shape(name: str, options: dict[str, Any] | None = None) -> TreeShape:
    try:
        cls = TREE_SHAPES[name]
    except KeyError:
        known = ", ".join([CHAIN, *sorted(TREE_SHAPES)])
        raise SpecDecodeError(f"unknown tree shape {name!r}; choose one of: {known}") from None
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise SpecDecodeError(f"bad options for tree {name!r}: {exc}") from None


__all__ = ["CHAIN", "TREE_SHAPES", "Expander", "TreeShape", "make_tree_shape"]
