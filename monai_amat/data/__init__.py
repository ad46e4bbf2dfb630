from monai_amat.data.isbi2015 import (
    ISBI2015_SOURCES,
    NUM_LANDMARKS,
    PIXEL_SPACING_MM,
    find_isbi2015_root,
    isbi2015_datalist,
    isbi2015_split,
    make_embedded_isbi2015,
    read_annotation,
    read_isbi2015_image,
)
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
    "ISBI2015_SOURCES",
    "NUM_LANDMARKS",
    "PIXEL_SPACING_MM",
    "find_isbi2015_root",
    "isbi2015_datalist",
    "isbi2015_split",
    "make_embedded_isbi2015",
    "read_annotation",
    "read_isbi2015_image",
]
