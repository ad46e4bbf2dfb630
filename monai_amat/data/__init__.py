from monai_amat.data.bccd import (
    BCCD_CLASSES,
    BCCD_SOURCES,
    BCCD_SPLITS,
    bccd_datalist,
    find_bccd_root,
    read_voc_annotation,
)
from monai_amat.data.detection import PrepareDetectionBatch, bccd_sets, detection_collate
from monai_amat.data.isbi2015 import (
    ISBI2015_SOURCES,
    NUM_LANDMARKS,
    PIXEL_SPACING_MM,
    find_isbi2015_root,
    isbi2015_datalist,
    isbi2015_split,
    read_annotation,
    read_isbi2015_image,
)
from monai_amat.data.msd import (
    MSD_TASKS,
    MSDDataset,
    check_case,
    prepare_msd,
    read_msd,
    split_cases,
)
from monai_amat.data.samplers import ForegroundOversampler, foreground_flags
from monai_amat.data.synthetic import make_crowded_nuclei, make_embedded_bccd, make_embedded_isbi2015, make_embedded_msd
from monai_amat.data.utils import add_sample_index

__all__ = [
    "add_sample_index",
    "ForegroundOversampler",
    "foreground_flags",
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
    "BCCD_CLASSES",
    "BCCD_SOURCES",
    "BCCD_SPLITS",
    "bccd_datalist",
    "find_bccd_root",
    "make_crowded_nuclei",
    "make_embedded_bccd",
    "read_voc_annotation",
    "bccd_sets",
    "detection_collate",
    "PrepareDetectionBatch",
]
