"""One ``torch.autograd.Function`` per fused op, with backend dispatch. No ``nn.Module`` here."""
from petal_fast.reference.rng import dropout_mask

from .petal_linear import PetalLinearFunction, petal_linear

__all__ = ["PetalLinearFunction", "dropout_mask", "petal_linear"]
