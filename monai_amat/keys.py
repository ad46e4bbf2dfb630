"""Output keys and events of the adversarial engines: a neutral module that engines and handlers both import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, StrEnum, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import EventEnum
else:
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["AttackEvents", "AttackKeys"]


class AttackEvents(EventEnum):
    """Events of the adversarial engines, besides MONAI's ``IterationEvents``.

    - ``ATTACK_COMPLETED``: a trainer's attack and adversarial pass have run (after ``FORWARD_COMPLETED``, the clean
      pass, and before ``LOSS_COMPLETED``); ``engine.state.output`` holds its per-sample results (batch level,
      before decollation).
    - ``ROBUSTNESS_COMPLETED``: a ``RobustEvaluator`` has evaluated every eps; ``engine.state.robustness`` holds
      the metrics per eps.
    """

    ATTACK_COMPLETED = "attack_completed"
    ROBUSTNESS_COMPLETED = "robustness_completed"


class AttackKeys(StrEnum):
    """Keys the adversarial trainers add to ``engine.state.output``.

    Named apart from ``monai.utils.AdversarialKeys``, the keys of MONAI's GAN trainer.
    """

    INDEX = "index"
    ADV_IMAGE = "adv_image"
    ADV_PRED = "adv_pred"
    EPS = "eps"
    FOUND = "found"
    NOISE_NORM = "noise_norm"
    BOUNDARY_NORM = "boundary_norm"
    START_WRONG = "start_wrong"
    CLEAN_CORRECT = "clean_correct"
    CLEAN_LOSS = "clean_loss"
    ADV_LOSS = "adv_loss"
