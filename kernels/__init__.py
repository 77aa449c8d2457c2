"""Triton kernels and their launchers, one file per op; installed as ``petal_fast.kernels``.

PetalLinear's are in four: ``petal_linear`` (launchers, the op's entry points), ``petal_linear_kernels``
(the ``@triton.jit`` code), ``petal_linear_config`` (tile tables and designs) and ``tune_petal_linear``
(the re-tuning / compile-check command). Imported lazily by ``petal_fast.ops`` only when the Triton
backend is chosen, so a machine without Triton (or without a GPU) never imports them.
"""
