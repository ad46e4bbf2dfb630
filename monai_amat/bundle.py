"""Moved to :py:mod:`monai_amat.apps.bundle`.

This path keeps working, with a ``FutureWarning``, for one release.
"""

import sys

from monai_amat.utils import moved_module

sys.modules[__name__] = moved_module(__name__, "monai_amat.apps.bundle")
