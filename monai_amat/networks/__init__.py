from monai_amat.networks.detection import FocalLossPerPositive, ResNetFPN, retinanet_detector

__all__ = ["FocalLossPerPositive", "ResNetFPN", "retinanet_detector"]
