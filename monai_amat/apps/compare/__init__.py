"""The paper's comparison protocol on one bundle: STD, calibration, AMAT, SAT at several eps, robust evaluation.

``python -m monai_amat.apps.compare --bundle bundles/NAME --output_dir DIR [--epochs N] [--attack_steps K]
[--data_source ...] [--dataset_dir ...] [--sat_eps "[...]"] [--seeds "[...]"] [--KEY VALUE ...]`` runs, with the
bundle's own configs (each stage a ``python -m monai.bundle run`` process, or in this process with ``--in_process``):

1. standard training (``train.json`` + ``train_std.json``) into ``DIR/std``;
2. calibration of the criterion from that model (``train.json`` + ``calibrate.json``) into ``DIR/thresholds.json``;
3. AMAT training (``train.json``) into ``DIR/amat``, with those thresholds;
4. SAT training (``train.json`` + ``train_sat.json``) at each eps of the bundle's ``sat_eps_list`` (or
   ``--sat_eps``) into ``DIR/sat_<eps>``;
5. robust evaluation (``evaluate.json`` merged over each model's training configs) of every model at the bundle's
   ``eps_list``: ``robustness.json`` and ``.png`` in each run folder;

then writes ``DIR/comparison.json``, ``DIR/comparison.md`` (one table per metric: rows models, columns clean and
each eps, AUC, training time; then the verdict on the paper's claims) and ``DIR/comparison.png`` (one panel per
metric, one line per model, and a clean-metric-vs-AUC panel).

Without ``--seeds`` every model is trained once, with the bundle's ``seed``. ``--seeds "[0, 1, 2]"`` repeats the
whole protocol once per seed (the bundle key ``seed`` given as an override), into ``DIR/std_s<seed>``,
``DIR/thresholds_s<seed>.json``, ``DIR/amat_s<seed>``, ``DIR/sat_<eps>_s<seed>``; the comparison then shows the
means over the seeds with their sample standard deviations.

Every other ``--KEY VALUE`` (a Python literal, else a string) is passed to every run as a config override.
``--attack_steps K`` sets both the evaluation's ``attack_steps`` and the training attack's ``train_attack_steps``
(an explicit ``--train_attack_steps`` wins for training). A stage is skipped when its output exists and its record
(``compare_*.json``) says it finished with the same settings; an interrupted training resumes from its
``checkpoint.pt``; a changed evaluation setting (e.g. ``--eps_list``) re-evaluates; a changed training setting is
refused (use another ``--output_dir``, or delete that run folder).
"""

from monai_amat.apps.compare.cli import build_parser, main
from monai_amat.apps.compare.common import CompareError, parse_sat_eps, parse_seeds
from monai_amat.apps.compare.report import (
    claims_verdict,
    combine_seeds,
    comparison_markdown,
    load_model_result,
    write_comparison,
)
from monai_amat.apps.compare.stages import Comparison, ModelRun, StageError, bundle_defaults

__all__ = [
    "CompareError",
    "StageError",
    "ModelRun",
    "Comparison",
    "bundle_defaults",
    "parse_sat_eps",
    "parse_seeds",
    "load_model_result",
    "combine_seeds",
    "claims_verdict",
    "comparison_markdown",
    "write_comparison",
    "build_parser",
    "main",
]
