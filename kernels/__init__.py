"""Triton kernels and their launchers, one file per op; installed as ``petal_fast.kernels``.

Imported lazily by ``petal_fast.ops`` only when the Triton backend is chosen, so a machine
without Triton (or without a GPU) never imports them.
"""
