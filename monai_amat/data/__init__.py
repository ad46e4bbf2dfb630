from monai_amat.data.msd import (
    MSD_TASKS,
    MSDDataset,
    check_case,
    make_embedded_msd,
    prepare_msd,
    read_msd,
    split_cases,
)
from monai_amat.data.utils import add_sample_index

__all__ = [
    "add_sample_index",
    "MSD_TASKS",
    "MSDDataset",
    "check_case",
    "make_embedded_msd",
    "prepare_msd",
    "read_msd",
    "split_cases",
]
