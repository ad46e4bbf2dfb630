"""``python -m monai_amat.apps.compare``: see :py:mod:`monai_amat.apps.compare`."""

import sys

from monai_amat.apps.compare.cli import main

sys.exit(main())
