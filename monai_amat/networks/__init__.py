from monai_amat.networks.detection import ResNetFPN, retinanet_detector

__all__ = ["ResNetFPN", "retinanet_detector"]
