from monai_amat.transforms.landmarks import (
    DecodeLandmarksd,
    LandmarkTargetd,
    ResizeWithLandmarksd,
    decode_landmarks,
    landmark_target,
    split_landmark_output,
)

__all__ = [
    "DecodeLandmarksd",
    "LandmarkTargetd",
    "ResizeWithLandmarksd",
    "decode_landmarks",
    "landmark_target",
    "split_landmark_output",
]
