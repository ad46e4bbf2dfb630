from monai_amat.handlers.margin_handler import MarginHandler
from monai_amat.handlers.robustness_report import RobustnessReport, area_under_curve, plot_robustness

__all__ = ["MarginHandler", "RobustnessReport", "area_under_curve", "plot_robustness"]
