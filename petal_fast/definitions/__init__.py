"""What every backend and the test oracle share by definition, and nothing else.

- :mod:`.dropout`: the counter hash that *defines* PetalLinear's dropout masks (a mask is a pure
  function of seed, branch, row and column, so every backend must draw the same bits);
- :mod:`.petal_linear`: the names of the Triton designs (the ``triton_design`` setting's values);
- :mod:`.margin_loss`: the margin-loss names, default margins and the ε constants of the formulas.

Formulas are not shared: ``petal_fast.reference`` writes each one out on its own, so a bug in a
fused path cannot hide behind the oracle it is checked against. Imports only torch.
"""
