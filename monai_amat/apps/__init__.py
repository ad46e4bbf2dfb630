"""The applications built on the package, kept together as ``monai.apps`` keeps MONAI's.

The bundles' config helpers (:py:mod:`.bundle`), the comparison runner (:py:mod:`.compare`), the demo
(:py:mod:`.demo`) and the per-rank handler selection (:py:mod:`.distributed`).

Kept light: importing a sub-module does not load the others.
"""

from pathlib import Path

__all__ = ["REPOSITORY_BUNDLES"]

# the bundles folder beside the package, in a repository checkout (an editable install)
REPOSITORY_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
