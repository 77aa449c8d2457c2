"""The benchmark suites the runner knows: CLI name → per-op script, title, CSV suite names.

Each script exposes ``run(quick: bool = False, device: str | None = None) -> list[dict]`` and a
``SUITE`` constant naming its results file ``<SUITE>.csv``.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Suite:
    key: str                     # name on the command line
    module: str                  # the per-op script
    title: str                   # heading in tables, charts and docs/performance.md
    csv_names: tuple[str, ...]   # SUITE values the script may use (results file stem)
    goal: str                    # the docs/design.md §6 target, quoted in docs/performance.md
    gpu: bool = True             # has GPU results to wait for (the host suite measures on a CPU only)


SUITES: dict[str, Suite] = {s.key: s for s in (
    Suite("linear", "benchmarks.bench_petal_linear", "PetalLinear (quality-weighted two-branch LoRA)", ("linear",),
          "fwd+bwd at p = 0: ≤ floor + 0.04 × frozen base on CPU fp32 (floor = 1 + 1.5·R(K+N)/(NK): 1.083 at "
          "384→1152, 1.042 at 768→2304, 1.021 at 1536→4608, 1.012 at 4096², r = 8), ≤ 1.08× cuBLAS base on "
          "H100/H200 bf16 at 8192×4096², ≥ 1.9× (CPU) / ≥ 1.6× (GPU) faster than the released eager layer; "
          "fwd at p = 0: ≤ floor + 0.03 (CPU) / ≤ 1.05× (GPU) frozen base"),
    Suite("loss", "benchmarks.bench_margin_loss", "Margin-softmax loss (fused online-LSE vs materialised)",
          ("loss", "margin", "margin_loss"),
          "fwd+bwd at C ≥ 100k: peak extra memory ≤ 5% of the materialised loss, time ≤ 1.0×"),
    Suite("quality", "benchmarks.bench_brisque", "Batched BRISQUE quality", ("quality", "brisque"),
          "64 images: ≥ 20× faster than the `brisque` package on CPU on every install route; ≤ 5% of a training step on H100"),
    Suite("e2e", "benchmarks.bench_e2e", "PETALface end to end (training step, inference)", ("e2e",),
          "training step ≥ 1.3× (CPU) / ≥ 1.5× (H100) faster than the reference model"),
    Suite("host", "benchmarks.bench_host", "PetalLinear CUDA host path (µs per call, launches stubbed)", ("host",),
          "at every PETALface shape in training (p = 0.1, α scope): forward ≤ 100 µs, backward ≤ 300 µs of host "
          "time on the project's 2-core CPU", gpu=False),
    Suite("calls", "benchmarks.bench_cpu_calls", "PetalLinear eager calls on CPU at the demo's shapes (vs F.linear)",
          ("calls",), "eager calls at the cost of the work: fixed host cost per call small against the demo "
          "layers' F.linear time; fwd+bwd at the demo batch near the flop floor", gpu=False),
    Suite("contention", "benchmarks.bench_contention", "Training on a shared CPU (quiet vs beside busy processes)",
          ("contention",), "training step beside as many busy processes as cores (pinned to the same cores): "
          "≥ 0.4× the quiet throughput on 2 cores", gpu=False),
    Suite("deploy", "benchmarks.bench_deploy", "PETALface deployment (eager, torch.compile, ONNX Runtime)",
          ("deploy",), "compiled ≥ eager (training step and inference); exported files equal PyTorch's embeddings"),
)}
ALIASES = {"margin": "loss", "margin_loss": "loss", "brisque": "quality", "petal_linear": "linear"}


class SuiteUnavailable(RuntimeError):
    """A selected suite whose script is missing or lacks ``run(quick, device)``."""


def parse_selection(text: str | None) -> list[Suite]:
    """``"linear,loss"`` → suites in the order given; None or ``"all"`` → every suite."""
    if not text or text == "all":
        return list(SUITES.values())
    out: list[Suite] = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        key = ALIASES.get(name, name)
        if key not in SUITES:
            raise ValueError(f"--suite: unknown suite {name!r}; choose from {', '.join(SUITES)}")
        if SUITES[key] not in out:
            out.append(SUITES[key])
    if not out:
        raise ValueError("--suite: no suite named")
    return out


def load(suite: Suite) -> ModuleType:
    """Import the suite's script and check it has ``run(quick, device)`` and ``SUITE``."""
    try:
        module = importlib.import_module(suite.module)
    except ModuleNotFoundError as e:
        if e.name == suite.module:
            raise SuiteUnavailable(f"{suite.key}: {suite.module.replace('.', '/')}.py does not exist yet") from e
        raise
    run = getattr(module, "run", None)
    params = inspect.signature(run).parameters if callable(run) else {}
    if "quick" not in params or "device" not in params:
        raise SuiteUnavailable(f"{suite.key}: {suite.module} has no run(quick, device)")
    if not isinstance(getattr(module, "SUITE", None), str):
        raise SuiteUnavailable(f"{suite.key}: {suite.module} has no SUITE name for its results file")
    return module


def of_results(csv_name: str) -> Suite | None:
    """The suite that writes ``<csv_name>.csv``, if known."""
    return next((s for s in SUITES.values() if csv_name in s.csv_names), None)


def title(csv_name: str) -> str:
    """The heading for a results file stem (falls back to the stem itself)."""
    suite = of_results(csv_name)
    return suite.title if suite else csv_name


def order(csv_name: str) -> tuple[int, str]:
    """Sort key: the suites in ``SUITES`` order, unknown results files after them by name."""
    keys = list(SUITES)
    suite = of_results(csv_name)
    return (keys.index(suite.key) if suite else len(keys), csv_name)
