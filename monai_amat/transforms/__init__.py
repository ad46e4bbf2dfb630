from monai_amat.transforms.boxes import ResizeWithBoxesd, boxes_to_original
from monai_amat.transforms.landmarks import (
    DecodeLandmarksd,
    LandmarkTargetd,
    ResizeWithLandmarksd,
    decode_landmarks,
    landmark_target,
    split_landmark_output,
)

__all__ = [
    "ResizeWithBoxesd",
    "boxes_to_original",
    "DecodeLandmarksd",
    "LandmarkTargetd",
    "ResizeWithLandmarksd",
    "decode_landmarks",
    "landmark_target",
    "split_landmark_output",
]
