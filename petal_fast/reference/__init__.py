"""Plain-PyTorch implementations written to mirror the formulas: the test oracle.

Imports only torch and ``petal_fast.definitions`` (the dropout hash and the margin-loss names and
constants, which are definitions rather than formulas). Each function is the literal formula of
docs/design.md, float64-capable; no fused path, kernel, module or model calls into this package.
"""
from .petal_linear import branch_weights, petal_linear, released_petal_linear
from .rng import dropout_mask

__all__ = ["branch_weights", "dropout_mask", "petal_linear", "released_petal_linear"]
