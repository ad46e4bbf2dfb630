from monai_amat.engines.evaluator import RobustEvaluator, check_eps_list
from monai_amat.engines.probes import BreakingEps, GradientMaskingChecks
from monai_amat.engines.trainer import AMATTrainer, RobustTrainer, SATTrainer
from monai_amat.engines.utils import deprecated_name

__all__ = [
    "AMATTrainer",
    "BreakingEps",
    "GradientMaskingChecks",
    "RobustEvaluator",
    "RobustTrainer",
    "SATTrainer",
    "check_eps_list",
]


def __getattr__(name: str):  # AdversarialKeys / AdversarialEvents: renamed, see monai_amat.keys
    return deprecated_name(__name__, name)
