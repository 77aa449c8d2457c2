"""petal_fast.data: face data sets (RecordIO, ImageFolder, synthetic), degradation and loaders.

Every data set is map-style: ``ds[i]`` → (H×W×3 uint8 RGB image, integer label).
"""
from .degrade import Degrade, DegradedFaces, DegradeParams, degrade, gaussian_blur
from .image_folder import ImageFolderFaces
from .loader import collate_faces, make_loader, to_tensor
from .recordio import RecordIO, RecordIOError, write_recordio
from .resized import ResizedFaces
from .synthetic import SyntheticFaces

__all__ = ["Degrade", "DegradeParams", "DegradedFaces", "ImageFolderFaces", "RecordIO", "RecordIOError",
           "ResizedFaces", "SyntheticFaces", "collate_faces", "degrade", "gaussian_blur", "make_loader", "to_tensor", "write_recordio"]
