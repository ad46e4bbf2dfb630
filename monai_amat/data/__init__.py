from monai_amat.data.utils import add_sample_index

__all__ = ["add_sample_index"]
