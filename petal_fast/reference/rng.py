"""The oracle's dropout mask: the counter hash is a definition, not a formula to re-derive.

Every backend must draw bit-identical masks, so the oracle uses the one definition every backend
is checked against, :mod:`petal_fast.definitions.dropout` (see there for the hash).
"""
from __future__ import annotations

from petal_fast.definitions.dropout import (GOLDEN, MASK32, MUL1, MUL2, branch_key, dropout_mask, keep_threshold,
                                            mix32, stream_seed)

__all__ = ["GOLDEN", "MASK32", "MUL1", "MUL2", "branch_key", "dropout_mask", "keep_threshold", "mix32", "stream_seed"]
