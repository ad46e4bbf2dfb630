from monai_amat.engines.evaluator import EvaluationPass, RobustEvaluator, check_eps_list
from monai_amat.engines.probes import BreakingEps, GradientMaskingChecks
from monai_amat.engines.trainer import AMATTrainer, RobustTrainer, SATTrainer

__all__ = [
    "AMATTrainer",
    "EvaluationPass",
    "BreakingEps",
    "GradientMaskingChecks",
    "RobustEvaluator",
    "RobustTrainer",
    "SATTrainer",
    "check_eps_list",
]
