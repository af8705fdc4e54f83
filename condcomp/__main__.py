"""``python -m condcomp``: the same as the ``condcomp`` console script."""

from condcomp.cli import console

console()
