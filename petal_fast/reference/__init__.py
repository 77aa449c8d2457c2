"""Plain-PyTorch implementations written to mirror the formulas: the test oracle.

Imports only torch. Each function is the literal formula of docs/design.md, float64-capable.
"""
from .petal_linear import branch_weights, petal_linear, released_petal_linear
from .rng import dropout_mask

__all__ = ["branch_weights", "dropout_mask", "petal_linear", "released_petal_linear"]
