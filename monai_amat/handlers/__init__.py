from monai_amat.handlers.calibration import CalibrationHandler
from monai_amat.handlers.checkpoint import TrainingCheckpoint
from monai_amat.handlers.detection_writer import DetectionWriter
from monai_amat.handlers.landmark_writers import LandmarkErrorsCSV, LandmarkWriter
from monai_amat.handlers.margin_handler import MarginHandler, label_has_foreground
from monai_amat.handlers.robustness_report import RobustnessReport, area_under_curve, plot_robustness

__all__ = [
    "CalibrationHandler",
    "DetectionWriter",
    "LandmarkErrorsCSV",
    "LandmarkWriter",
    "MarginHandler",
    "RobustnessReport",
    "TrainingCheckpoint",
    "area_under_curve",
    "label_has_foreground",
    "plot_robustness",
]
