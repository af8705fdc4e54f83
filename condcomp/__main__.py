"""``python -m condcomp``: the same as the ``condcomp`` console script."""

import sys

from condcomp.cli import main

sys.exit(main())
