"""Small synthetic stand-ins for the paper's data sets.

Each is written in its data set's real layout and format, so that the readers, bundles and tests run on them exactly
as on the real data (which cannot be downloaded here).
"""

from monai_amat.data.synthetic.bccd import make_embedded_bccd
from monai_amat.data.synthetic.isbi2015 import make_embedded_isbi2015
from monai_amat.data.synthetic.msd import make_embedded_msd
from monai_amat.data.synthetic.nuclei import make_crowded_nuclei

__all__ = ["make_embedded_bccd", "make_embedded_isbi2015", "make_embedded_msd", "make_crowded_nuclei"]
