"""JSON that is JSON: Python writes NaN and ±inf as the bare words ``NaN`` / ``Infinity``, which no
strict parser accepts. Every JSON file petal_fast writes (``log.jsonl``, ``summary.json``,
``eval.json``) goes through :func:`dumps`, which writes a non-finite number as the string
``"nan"``, ``"inf"`` or ``"-inf"``."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (numpy's too) replaced by ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(obj, float) or type(obj).__name__ in ("float32", "float64", "float16"):
        value = float(obj)
        if math.isfinite(value):
            return obj
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN`` / ``Infinity`` (see the module docstring)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
