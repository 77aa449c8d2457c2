"""The trained BRISQUE model, read as data from the installed ``brisque`` distribution, and its
batched RBF ε-SVR.

    score(f) = Σ_i c_i · exp(−g · ‖f' − s_i‖²) − ρ,     f' = −1 + 2 (f − min) / (max − min)

``svm.txt`` (libsvm text format) holds g, ρ, and the support vectors s_i with coefficients c_i;
``normalize.pickle`` holds min/max. The files are located through the distribution's metadata (or
the import system's spec) without importing ``brisque`` — its import needs OpenCV — and the pickle
is read by an unpickler that admits nothing but plain containers and NumPy array reconstruction.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .._graph import graph_constant, real_tensors

_FILES = ("svm.txt", "normalize.pickle")
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


@dataclass(frozen=True)
class BrisqueModel:
    """Feature scaling and RBF ε-SVR, as float64 tensors on one device."""
    f_min: torch.Tensor    # (36,)
    f_max: torch.Tensor    # (36,)
    support: torch.Tensor  # (n_sv, 36)
    coef: torch.Tensor     # (n_sv,)
    rho: float
    gamma: float

    def to(self, device: torch.device | str) -> "BrisqueModel":
        return BrisqueModel(self.f_min.to(device), self.f_max.to(device), self.support.to(device),
                            self.coef.to(device), self.rho, self.gamma)


def model_dir() -> Path:
    """``brisque/models`` of the installed distribution; the package itself is never imported."""
    try:
        dist = importlib.metadata.distribution("brisque")
        path = Path(dist.locate_file("brisque/models"))
        if all((path / f).is_file() for f in _FILES):
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("brisque")  # top-level: finds the spec without executing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "models"
            if all((path / f).is_file() for f in _FILES):
                return path
    raise ModuleNotFoundError("BRISQUE's trained model ships in the `brisque` package: `pip install brisque` "
                              "(petal_fast reads brisque/models/svm.txt and normalize.pickle as data)")


class _ArraysOnly(pickle.Unpickler):
    """Admits built-in containers/numbers and NumPy array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"normalize.pickle: refusing to load global {module}.{name}")


def load_scaling(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max of ``normalize.pickle`` as float64 tensors."""
    params = _ArraysOnly(io.BytesIO(path.read_bytes())).load()
    if not isinstance(params, dict) or "min_" not in params or "max_" not in params:
        raise ValueError(f"{path}: expected a dict with 'min_' and 'max_'")
    as_tensor = lambda v: torch.tensor([float(x) for x in v], dtype=torch.float64)  # noqa: E731
    return as_tensor(params["min_"]), as_tensor(params["max_"])


def parse_libsvm(text: str, n_features: int = 36) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(support vectors, coefficients, ρ, γ) of a libsvm ε-SVR model with an RBF kernel."""
    header, _, body = text.partition("\nSV\n")
    fields = dict(line.split(" ", 1) for line in header.splitlines() if " " in line)
    if fields.get("svm_type") != "epsilon_svr" or fields.get("kernel_type") != "rbf":
        raise ValueError(f"expected an epsilon_svr model with an rbf kernel, got {fields.get('svm_type')!r}, "
                         f"{fields.get('kernel_type')!r}")
    lines = [ln.split() for ln in body.splitlines() if ln.strip()]
    support = torch.zeros(len(lines), n_features, dtype=torch.float64)  # libsvm is sparse: absent = 0
    coef = torch.empty(len(lines), dtype=torch.float64)
    for i, parts in enumerate(lines):
        coef[i] = float(parts[0])
        for item in parts[1:]:
            j, v = item.split(":")
            support[i, int(j) - 1] = float(v)
    if len(lines) != int(fields["total_sv"]):
        raise ValueError(f"svm.txt: {len(lines)} support vectors, header says {fields['total_sv']}")
    return support, coef, float(fields["rho"]), float(fields["gamma"])


@functools.lru_cache(maxsize=None)
def _load_cpu() -> BrisqueModel:
    root = model_dir()
    f_min, f_max = load_scaling(root / "normalize.pickle")
    support, coef, rho, gamma = parse_libsvm((root / "svm.txt").read_text(), n_features=f_min.numel())
    return BrisqueModel(f_min, f_max, support, coef, rho, gamma)


@functools.lru_cache(maxsize=None)
@real_tensors
def load_model(device: str = "cpu") -> BrisqueModel:
    """The package's trained model on ``device`` (loaded once, cached per device)."""
    return _load_cpu().to(device)


def predict(features: torch.Tensor, model: BrisqueModel) -> torch.Tensor:
    """(B, 36) float64 raw features → (B,) scores: scaling, then the RBF over all support vectors at once."""
    model = BrisqueModel(*(graph_constant(t) for t in (model.f_min, model.f_max, model.support, model.coef)),
                         model.rho, model.gamma)
    x = -1 + 2.0 / (model.f_max - model.f_min) * (features - model.f_min)
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ model.support.T + (model.support ** 2).sum(1)
    return torch.exp(-model.gamma * d2.clamp_min(0)) @ model.coef - model.rho
