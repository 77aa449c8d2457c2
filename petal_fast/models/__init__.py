"""Face backbones (PETALface's Swin, arcface_torch's ViT), the PETALface model, weight files, factory."""
from .attention import ATTENTION_IMPLS, set_attention_impl
from .factory import MODES, build_model
from .petalface import FaceModel, ParameterReport, PetalFace, build_backbone
from .presets import SWIN_PRESETS, VIT_PRESETS, face_swin, face_vit
from .swin import FaceSwin
from .vit import FaceViT
from .weights import (CheckpointError, LoadReport, from_released, full_state_dict, load_petalface_checkpoint,
                      safe_load, save_checkpoint, to_released, trainable_state_dict, unwrap_state_dict)

__all__ = ["ATTENTION_IMPLS", "CheckpointError", "FaceModel", "FaceSwin", "FaceViT", "LoadReport", "MODES",
           "ParameterReport", "PetalFace", "SWIN_PRESETS", "VIT_PRESETS", "build_backbone", "build_model",
           "face_swin", "face_vit", "from_released", "full_state_dict", "load_petalface_checkpoint", "safe_load",
           "save_checkpoint", "set_attention_impl", "to_released", "trainable_state_dict", "unwrap_state_dict"]
