"""petal_fast.data: face data sets (RecordIO, ImageFolder, synthetic), degradation and loaders.

Every data set is map-style: ``ds[i]`` → (H×W×3 uint8 RGB image, integer label).
"""
from .degrade import Degrade, DegradedFaces, DegradeParams, degrade, gaussian_blur
from .loader import collate_faces, make_loader, to_tensor
from .synthetic import SyntheticFaces

__all__ = ["Degrade", "DegradeParams", "DegradedFaces", "SyntheticFaces", "collate_faces", "degrade",
           "gaussian_blur", "make_loader", "to_tensor"]
