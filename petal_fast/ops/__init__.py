"""The fused ops (PyTorch operators in ``torch.library``) with backend dispatch. No ``nn.Module`` here."""
from petal_fast.definitions.dropout import dropout_mask

from .petal_linear import petal_linear
from .petal_linear_library import fused_petal_linear, fused_petal_linear_backward

__all__ = ["dropout_mask", "fused_petal_linear", "fused_petal_linear_backward", "petal_linear"]
