"""Moved to :py:mod:`monai_amat.apps.demo`.

This path, and ``python -m monai_amat.demo``, keep working, with a ``FutureWarning``, for one release.
"""

import sys

from monai_amat.utils import moved_module

if __name__ == "__main__":
    sys.exit(moved_module("monai_amat.demo", "monai_amat.apps.demo").main())
sys.modules[__name__] = moved_module(__name__, "monai_amat.apps.demo")
