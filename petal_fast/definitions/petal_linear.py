"""PetalLinear names shared by the Triton kernels and the settings: the two designs of the Triton
kernels (docs/design.md §3.3), the values of the ``triton_design`` setting."""
from __future__ import annotations

TRITON_DESIGNS = ("split", "onepass")
