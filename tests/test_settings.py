"""The one settings object (petal_fast.settings): read once, validated, changed only explicitly."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, strategies as st

import petal_fast
from petal_fast import _ext, info, settings
from petal_fast.kernels import petal_linear_config

# One good non-default value per setting, as the variable spells it and as the field holds it.
GOOD = {"backend": (" Torch ", "torch"), "build": ("NEVER", "never"),
        "cache_dir": ("~/pf-cache", Path.home() / "pf-cache"),
        "progress_interval": ("2.5", 2.5), "debug": ("yes", True), "triton_design": ("onepass", "onepass"),
        "cpu_path": ("whole", "whole"), "cpu_block_rows": ("24", 24), "threads": (" 1 ", 1)}
# A bad value per variable, and a piece of the allowed values its error must list.
BAD = {"backend": ("fastest", "auto, reference, torch, cpp, triton"), "build": ("sometimes", "auto, never, always"),
       "progress_interval": ("soon", "seconds >= 0"), "debug": ("maybe", "1, true, yes, on"),
       "triton_design": ("fused", "split, onepass"), "cpu_path": ("diagonal", "auto, blocked, whole"),
       "cpu_block_rows": ("-3", "0 (automatic) or a positive whole number"),
       "threads": ("many", "0 (automatic) or a positive whole number of threads")}


def test_every_field_has_its_variable_and_a_default():
    fields = [f.name for f in dataclasses.fields(settings.Settings)]
    assert fields == list(settings.ENV) == list(GOOD)
    assert all(var.startswith("PETAL_FAST_") for var in settings.ENV.values())
    assert settings.from_environ({}) == settings.Settings()
    assert settings.from_environ({var: "  " for var in settings.ENV.values()}) == settings.Settings()  # empty: unset
    assert settings.TRITON_DESIGNS == petal_linear_config.DESIGNS


def test_each_variable_is_parsed():
    for field, (raw, value) in GOOD.items():
        parsed = settings.from_environ({settings.ENV[field]: raw})
        assert getattr(parsed, field) == value, field
        assert dataclasses.replace(parsed, **{field: getattr(settings.Settings(), field)}) == settings.Settings()


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_names_the_variable_the_value_and_the_choices(field):
    raw, allowed = BAD[field]
    with pytest.raises(ValueError) as err:
        settings.from_environ({settings.ENV[field]: raw})
    assert settings.ENV[field] in str(err.value) and repr(raw) in str(err.value) and allowed in str(err.value)
    with pytest.raises(ValueError, match=f"{field} .{settings.ENV[field]}."):  # the API names both
        settings.configure(**{field: raw})


@given(st.integers(min_value=0, max_value=10**9))
def test_block_rows_round_trip(rows):
    assert settings.from_environ({"PETAL_FAST_CPU_BLOCK_ROWS": f" {rows} "}).cpu_block_rows == rows


@given(st.text(max_size=12))
def test_a_choice_is_one_of_its_values_or_an_error(text):
    try:
        parsed = settings.from_environ({"PETAL_FAST_BACKEND": text}).backend
    except ValueError as err:
        assert "PETAL_FAST_BACKEND must be one of" in str(err)
    else:
        assert parsed in settings.BACKEND_CHOICES and (parsed == "auto" or parsed == text.strip().lower())


def test_configure_validates_everything_before_changing_anything():
    before = settings.current()
    with pytest.raises(ValueError, match="cpu_block_rows"):
        settings.configure(backend="torch", cpu_block_rows=-1)
    with pytest.raises(TypeError, match="unknown setting.*colour.*the settings are backend"):
        settings.configure(colour="blue")
    assert settings.current() is before


def test_override_restores_what_it_changed_and_nests():
    before = settings.current()
    with settings.override(backend="reference", progress_interval=4) as inside:
        assert settings.current() is inside and (inside.backend, inside.progress_interval) == ("reference", 4.0)
        assert petal_fast.requested_backend() == "reference"
        with settings.override(backend="torch"):
            assert petal_fast.requested_backend() == "torch"
            with petal_fast.use_backend("cpp"):  # the scoped, per-thread choice wins over the setting
                assert petal_fast.requested_backend() == "cpp"
        assert settings.current().backend == "reference"
        with pytest.raises(RuntimeError, match="boom"), settings.override(debug=True):
            raise RuntimeError("boom")
        assert settings.current().debug == before.debug
    assert settings.current() == before


def test_every_context_manager_is_per_thread():
    """override, use_backend, use_design, cpu_tuning and alpha_scope change what this thread's calls use;
    another thread running meanwhile sees the process's settings (docs/design.md §3.7)."""
    from petal_fast.cpu_tuning import get_cpu_tuning
    seen, inside, go = [], threading.Event(), threading.Event()

    def other():
        inside.wait()
        s = settings.current()
        seen.append((s.progress_interval, s.triton_design, petal_fast.requested_backend(),
                     petal_linear_config.forced_design(), petal_fast.nn.context.current_alpha()))
        go.set()

    worker = threading.Thread(target=other)
    worker.start()
    alpha = torch.rand(2)
    with settings.override(progress_interval=3, triton_design="onepass", cpu_path="whole"), \
            petal_fast.use_backend("reference"), petal_linear_config.use_design("split"), \
            petal_fast.alpha_scope(alpha):
        inside.set()
        go.wait()
        assert (settings.current().progress_interval, settings.current().triton_design) == (3, "onepass")
        if _ext.has_op("petal_linear"):
            assert get_cpu_tuning()[0] == "whole"
    worker.join()
    process = settings.current()
    assert seen == [(process.progress_interval, process.triton_design, process.backend, None, None)]


def test_configure_inside_an_override_block_keeps_the_blocks_fields():
    before = settings.current()
    try:
        with settings.override(progress_interval=3):
            now = settings.configure(progress_interval=9, debug=not before.debug)
            assert now is settings.current() and (now.progress_interval, now.debug) == (3, not before.debug)
        assert (settings.current().progress_interval, settings.current().debug) == (9, not before.debug)
    finally:
        settings.configure(progress_interval=before.progress_interval, debug=before.debug)
    assert settings.current() == before
    with pytest.raises(TypeError, match="override: unknown setting"):
        with settings.override(colour="blue"):
            pass


@pytest.mark.skipif(not _ext.has_op("petal_linear"), reason="C++ extension not built")
def test_cpu_knobs_are_arguments_of_each_call():
    """Two threads run the C++ PetalLinear with different knobs at once: the library keeps no copy."""
    from petal_fast.cpu_tuning import cpu_tuning
    from petal_fast.ops.petal_linear import petal_linear
    x, w, a, b = torch.randn(64, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64), \
        torch.randn(2, 4, 24, dtype=torch.float64), torch.randn(2, 40, 4, dtype=torch.float64)
    alpha = torch.rand(8, dtype=torch.float64)
    want = petal_linear(x, w, None, a, b, alpha)
    got, errors = {}, []

    def run(path, rows):
        try:
            with cpu_tuning(path=path, block_rows=rows):
                for _ in range(20):
                    got[path] = petal_linear(x, w, None, a, b, alpha)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=knobs) for knobs in (("whole", 0), ("blocked", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(got) == {"whole", "blocked"}
    for y in got.values():
        torch.testing.assert_close(y, want)
    fwd = _ext.op("petal_linear_fwd")
    with pytest.raises(RuntimeError, match="path must be -1"):
        fwd(x, w, None, a, b, alpha, 1.0, 0.0, 0, 5, 0)
    with pytest.raises(RuntimeError, match="block_rows must be 0"):
        fwd(x, w, None, a, b, alpha, 1.0, 0.0, 0, -1, -2)


def test_the_triton_design_of_a_forward_is_kept_for_its_backward(monkeypatch):
    """use_design is per thread; the eager route keeps the forward's design for the backward, which
    autograd may run on another thread (on CUDA, its device thread)."""
    pytest.importorskip("triton")
    from petal_fast.kernels import petal_linear as launch
    from petal_fast.ops.petal_linear.library import EagerPetalLinear
    seen = []

    def fake_forward(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, design=None):
        seen.append(("fwd", design))
        return x @ weight.T, x.new_zeros(x.shape[0], lora_A.shape[0] * lora_A.shape[1])

    def fake_backward(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x, design=None):
        seen.append(("bwd", design))
        return dy @ weight, torch.zeros_like(lora_A), torch.zeros_like(lora_B)

    monkeypatch.setattr(launch, "forward", fake_forward)
    monkeypatch.setattr(launch, "backward", fake_backward)
    x = torch.randn(6, 8, requires_grad=True)
    args = (torch.randn(5, 8), None, torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 5, 2), torch.rand(3),
            1.0, 0.0, torch.zeros(1, dtype=torch.int64), 0, "triton")
    with petal_linear_config.use_design("onepass"):
        y = EagerPetalLinear.apply(x, *args)
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert seen == [("fwd", "onepass"), ("bwd", "onepass")] and x.grad is not None


def test_use_backend_stays_per_thread():
    seen = []
    with petal_fast.use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(petal_fast.requested_backend()))
        worker.start()
        worker.join()
        assert petal_fast.requested_backend() == "reference"
    assert seen == [settings.current().backend]


def test_design_setting_reaches_the_triton_launchers(monkeypatch):
    """kernels/ imports nothing of petal_fast but the definitions: the op's backend table reads the
    setting at each call and hands it to the launchers as their ``design`` argument."""
    pytest.importorskip("triton")
    from petal_fast.kernels import petal_linear as launch
    from petal_fast.ops.petal_linear import backends
    seen = []
    monkeypatch.setattr(launch, "forward", lambda *a, **k: seen.append(("fwd", k["design"])))
    monkeypatch.setattr(launch, "backward", lambda *a, **k: seen.append(("bwd", k["design"])))
    forward, backward = backends.BACKENDS["triton"]()
    with settings.override(triton_design="onepass"):
        forward(), backward()
    with settings.override(triton_design=None):
        forward()
    assert seen == [("fwd", "onepass"), ("bwd", "onepass"), ("fwd", None)]


@pytest.mark.skipif(not _ext.has_op("petal_linear"), reason="C++ extension not built")
def test_cpu_knobs_reach_the_library_and_cpu_tuning_sits_on_the_settings():
    from petal_fast.cpu_tuning import cpu_tuning, get_cpu_tuning
    before = get_cpu_tuning()
    assert before == (settings.current().cpu_path, settings.current().cpu_block_rows)
    with settings.override(cpu_path="whole", cpu_block_rows=40):
        assert get_cpu_tuning() == ("whole", 40)
        with cpu_tuning(block_rows=8) as now:
            assert now == ("whole", 8) and settings.current().cpu_block_rows == 8
        assert get_cpu_tuning() == ("whole", 40)
    assert get_cpu_tuning() == before


def test_a_configured_backend_is_a_compile_guard():
    """torch.compile reads the setting while tracing and guards on it: a change recompiles."""
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def tagged(x):
        return x + (1.0 if petal_fast.requested_backend() == "torch" else 2.0)

    x = torch.zeros(3)
    with settings.override(backend="torch"):
        assert tagged(x).tolist() == [1.0] * 3
        assert tagged(x).tolist() == [1.0] * 3
    with settings.override(backend="reference"):
        assert tagged(x).tolist() == [2.0] * 3
    assert counter.frame_count == 2


READ_ONCE = """
import json, os, torch
import petal_fast
from petal_fast import settings
from petal_fast.kernels.petal_linear_config import design_for
from petal_fast.progress import log_interval
for var in settings.ENV.values():
    os.environ[var] = {later!r}.get(var, "")  # after import: no effect
from petal_fast.cpu_tuning import get_cpu_tuning
s = settings.current()
print(json.dumps([s.backend, s.build, str(s.cache_dir), log_interval(), s.debug,
                  design_for(torch.device("cpu"), "fwd", s.triton_design),
                  list(get_cpu_tuning()), petal_fast.requested_backend(), torch.get_num_threads()]))
"""


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in settings.ENV.values()}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not _ext.has_op("petal_linear"), reason="C++ extension not built")
def test_the_environment_is_read_once_at_import(tmp_path):
    env = {"PETAL_FAST_BACKEND": "torch", "PETAL_FAST_BUILD": "auto", "PETAL_FAST_CACHE_DIR": str(tmp_path),
           "PETAL_FAST_PROGRESS_INTERVAL": "7", "PETAL_FAST_DEBUG": "1", "PETAL_FAST_TRITON_DESIGN": "onepass",
           "PETAL_FAST_CPU_PATH": "whole", "PETAL_FAST_CPU_BLOCK_ROWS": "24", "PETAL_FAST_THREADS": "1"}
    later = {"PETAL_FAST_BACKEND": "reference", "PETAL_FAST_BUILD": "sometimes", "PETAL_FAST_CACHE_DIR": "/elsewhere",
             "PETAL_FAST_PROGRESS_INTERVAL": "1", "PETAL_FAST_DEBUG": "0", "PETAL_FAST_TRITON_DESIGN": "split",
             "PETAL_FAST_CPU_PATH": "blocked", "PETAL_FAST_CPU_BLOCK_ROWS": "3", "PETAL_FAST_THREADS": "2"}
    out = _python(READ_ONCE.format(later=later), env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "torch", "auto", str(tmp_path), 7.0, True, "onepass", ["whole", 24], "torch", 1]


def test_a_bad_variable_fails_at_import_with_its_name():
    out = _python("import petal_fast", {"PETAL_FAST_CPU_PATH": "diagonal"})
    assert out.returncode != 0
    assert "PETAL_FAST_CPU_PATH must be one of auto, blocked, whole; got 'diagonal'" in out.stderr.splitlines()[-1]


@pytest.mark.parametrize("command", [["-m", "petal_fast.cli", "info"], ["-m", "petal_fast.train"],
                                     ["-m", "petal_fast.cli", "train", "mode=lora"]])
def test_a_bad_variable_in_a_command_is_one_line_exit_2(command):
    """A command (``petal-fast …``, ``python -m petal_fast.…``) reports it as any user error: before, an
    import traceback. PETAL_FAST_DEBUG=1 shows the traceback."""
    base = {k: v for k, v in os.environ.items() if k not in settings.ENV.values()}
    run = lambda env: subprocess.run([sys.executable, *command], env={**base, **env}, capture_output=True,  # noqa: E731
                                     text=True, timeout=300)
    out = run({"PETAL_FAST_BACKEND": "fast"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("petal-fast: error: PETAL_FAST_BACKEND must be one of auto, reference, torch, cpp, "
                                  "triton; got 'fast'")
    debug = run({"PETAL_FAST_BACKEND": "fast", "PETAL_FAST_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SettingsError" in debug.stderr


def test_info_shows_the_settings_in_force():
    with settings.override(backend="torch", progress_interval=5, triton_design=None):
        text, _ = info.report()
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert rows["backend"] == ["torch", "set", "PETAL_FAST_BACKEND"]
    assert rows["progress_interval"] == ["5.0", "set", "PETAL_FAST_PROGRESS_INTERVAL"]
    assert rows["triton_design"] == ["unset", "default", "PETAL_FAST_TRITON_DESIGN"]
    assert set(settings.ENV) <= set(rows)


def test_only_the_settings_module_reads_petal_fast_variables():
    """No other module (nor the kernels, nor the C++ sources) reads a PETAL_FAST_* variable itself."""
    import re
    root = Path(__file__).resolve().parents[1]
    reads = re.compile(r"(environ|getenv)\W{1,4}(get\W{1,3})?PETAL_FAST_")
    files = [*(root / "petal_fast").rglob("*.py"), *(root / "kernels").rglob("*.py"), *(root / "csrc").glob("*.*")]
    offenders = [str(p.relative_to(root)) for p in files if p.name != "settings.py" and reads.search(p.read_text())]
    assert offenders == []
    lower = [p for p in files if p.parts[-2] in ("kernels", "csrc") and re.search(r"os\.environ|getenv\(", p.read_text())]
    assert lower == []  # the lower layers get their settings handed down
