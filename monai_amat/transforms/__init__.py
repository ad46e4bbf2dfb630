from monai_amat.transforms.landmarks import (
    LandmarkTargetd,
    ResizeWithLandmarksd,
    decode_landmarks,
    landmark_target,
    split_landmark_output,
)

__all__ = ["LandmarkTargetd", "ResizeWithLandmarksd", "decode_landmarks", "landmark_target", "split_landmark_output"]
