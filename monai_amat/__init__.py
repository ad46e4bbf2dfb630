"""monai_amat: adaptive-margin adversarial training (AMAT) for MONAI."""

__version__ = "0.1.0"
