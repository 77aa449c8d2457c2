"""Install routes, as a new user meets them: a fresh virtualenv (not sharing this one's packages),
torch, then a plain ``pip install .`` with build isolation on, which has no torch to compile
against. The compiled CPU ops must still run: built just in time at first use, cached per (torch,
compiler, sources), reused by the next process, rebuilt when the cache entry belongs to another
torch, built once when two processes start together; and the wheel, sdist and editable routes
carry the sources. Slow (two C++ builds, ~4 min on 2 cores) but part of ``make test``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
import tarfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BUILD_LINE = "building petal_fast C++ ops for torch"
TORCH_REQ = os.environ.get("PETAL_FAST_TEST_TORCH", f"torch=={torch.__version__.split('+')[0]}")

# Run inside the fresh venv: the automatic choice on CPU is the compiled op, and it computes PetalLinear
# (forward and the adapter gradients) and BRISQUE as the float64 reference does.
OP_CALL = r"""
import torch, petal_fast
from petal_fast import _ext, backend, use_backend
from petal_fast.ops.petal_linear import petal_linear
from petal_fast.quality import brisque
from petal_fast.reference import petal_linear as ref
cpu = torch.device("cpu")
assert backend.resolve(cpu, "petal_linear") == "cpp", _ext.load_error()
assert backend.resolve(cpu, "brisque_score", ("reference", "torch", "cpp", "triton")) == "cpp"
x, w, b = torch.randn(2, 7, 24), torch.randn(16, 24) / 5, torch.randn(16)
A, B, alpha = (torch.randn(2, 4, 24) / 5).requires_grad_(), torch.randn(2, 16, 4).requires_grad_(), torch.rand(2)
y = petal_linear(x, w, b, A, B, alpha, 0.5)
y.square().sum().backward()
A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
y64 = ref(x.double(), w.double(), b.double(), A64, B64, alpha.double(), 0.5)
y64.square().sum().backward()
for got, want in ((y, y64), (A.grad, A64.grad), (B.grad, B64.grad)):
    assert (got.double() - want).norm() <= 1e-5 * want.norm(), (got, want)
images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
with use_backend("reference"):
    want = brisque(images)
assert torch.allclose(brisque(images), want, rtol=1e-6, atol=1e-6)
print("cpp ok", _ext.status().source, _ext.status().path)
"""


def _run(args: list, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{out.args}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def _copy_checkout(dest: Path) -> Path:
    """The repository's files as a clone has them (no .venv, no build outputs)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


class Venv:
    def __init__(self, root: Path):
        self.root, self.src, self.work = root, root / "src", root / "work"
        self.bin = root / "venv" / ("Scripts" if sys.platform == "win32" else "bin")
        self.python = self.bin / "python"
        self.work.mkdir()

    def env(self, cache: Path, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PETAL_FAST_", "PYTHON", "VIRTUAL_ENV", "TRITON_"))}
        env.update(PETAL_FAST_CACHE_DIR=str(cache), PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", **extra)
        return env

    def pip(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return _ok(_run([self.python, "-m", "pip", "--disable-pip-version-check", *args], self.env(self.root / "c0"),
                        self.work, timeout))

    def op_call(self, cache: Path, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([str(self.python), "-c", OP_CALL], env=self.env(cache, **extra), cwd=self.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def site_package(self) -> Path:
        out = _ok(_run([self.python, "-c", "import petal_fast, os; print(os.path.dirname(petal_fast.__file__))"],
                       self.env(self.root / "c0", PETAL_FAST_BUILD="never"), self.work))
        return Path(out.stdout.strip())


def _finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    """A fresh venv with torch and ``pip install .`` (build isolation on: no torch in the build)."""
    v = Venv(tmp_path_factory.mktemp("install"))
    _copy_checkout(v.src)
    start = time.perf_counter()
    _ok(_run([sys.executable, "-m", "venv", v.root / "venv"], os.environ, v.root))
    v.pip("install", "-q", TORCH_REQ)
    v.pip("install", "-q", str(v.src))
    print(f"\nfresh venv + torch + pip install .: {time.perf_counter() - start:.0f} s")
    return v


@pytest.fixture(scope="module")
def first_use(venv: Venv) -> tuple[subprocess.CompletedProcess, Path]:
    cache = venv.root / "cache"
    start = time.perf_counter()
    out = _run([venv.bin / "petal-fast", "info", "--require-fast"], venv.env(cache), venv.work, timeout=900)
    print(f"first use (C++ build): {time.perf_counter() - start:.0f} s")
    return out, cache


def test_isolated_install_builds_on_first_use(venv, first_use):
    out, cache = _ok(first_use[0]), first_use[1]
    assert out.stderr.count(BUILD_LINE) == 1, out.stderr
    assert "just-in-time build (user cache), compiled now" in out.stdout
    assert f"built for  torch {torch.__version__}" in out.stdout
    cpu_rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()
                if line.split()[:1] and line.split()[0] in ("petal_linear", "margin_loss", "brisque")}
    assert cpu_rows == {"petal_linear": "cpp", "margin_loss": "cpp", "brisque": "cpp"}, out.stdout
    package = venv.site_package()
    assert not list(package.glob("_C*.so")), "an isolated build has no torch: no AOT extension expected"
    assert (package / "csrc" / "petal_linear.cpp").exists() and (package / "csrc" / "hash32.h").exists()
    builds = list(cache.glob("torch-*/petal_fast_ops.so"))
    assert len(builds) == 1 and str(builds[0].parent.name).startswith(f"torch-{torch.__version__}-")


def test_second_process_reuses_the_build(venv, first_use):
    _ok(first_use[0])
    out = _ok(_finish(venv.op_call(first_use[1])))
    assert "cpp ok jit" in out.stdout and BUILD_LINE not in out.stderr, out.stderr
    assert "torch fallback" not in out.stderr


def test_aot_extension_of_another_torch_falls_back_to_the_cache(venv, first_use, tmp_path):
    """An ``_C`` that does not load (here: an undefined symbol, as a build against another torch
    gives) is reported and replaced by the cached just-in-time build; nothing is built again."""
    _ok(first_use[0])
    fake = venv.site_package() / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    _broken_library(fake, tmp_path)
    try:
        out = _ok(_run([venv.bin / "petal-fast", "info", "--require-fast"], venv.env(first_use[1]), venv.work))
    finally:
        fake.unlink()
    assert BUILD_LINE not in out.stderr and "just-in-time build" in out.stdout
    assert "petal_fast._C does not import" in out.stdout and "undefined symbol" in out.stdout


def test_stale_cache_rebuilt_once_by_two_processes(venv, first_use, tmp_path):
    """A cache entry left by another torch (its build.json says so and its library does not load)
    is rebuilt, not loaded; two processes starting together build it once and both run the op."""
    _ok(first_use[0])
    good = next(first_use[1].glob("torch-*/petal_fast_ops.so")).parent
    cache = tmp_path / "cache"
    stale = cache / good.name
    stale.mkdir(parents=True)
    (stale / "build.json").write_text(
        (good / "build.json").read_text().replace(f'"torch": "{torch.__version__}"', '"torch": "2.0.0"'))
    _broken_library(stale / "petal_fast_ops.so", tmp_path)
    procs = [venv.op_call(cache) for _ in range(2)]
    outs = [_ok(_finish(p)) for p in procs]
    assert sum(out.stderr.count(BUILD_LINE) for out in outs) == 1, [out.stderr for out in outs]
    assert all("cpp ok jit" in out.stdout for out in outs)
    assert f'"torch": "{torch.__version__}"' in (stale / "build.json").read_text()


def test_without_a_compiler_the_fallback_runs_and_says_why(venv, first_use, tmp_path):
    _ok(first_use[0])
    env = venv.env(tmp_path / "empty-cache", CXX="petal-fast-no-such-compiler")
    info = _run([venv.bin / "petal-fast", "info", "--require-fast"], env, venv.work)
    assert info.returncode == 1
    assert "no C++ compiler" in info.stderr and "apt-get install g++" in info.stderr
    assert "UNAVAILABLE: no C++ compiler" in info.stdout
    code = ("import warnings, torch\nwarnings.simplefilter('always')\nfrom petal_fast.ops.petal_linear import petal_linear\n"
            "y = petal_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 2, 8), torch.randn(2, 4, 2), "
            "torch.rand(1), 1.0)\nprint(y.shape)")
    out = _ok(_run([venv.python, "-c", code], env, venv.work))
    assert "torch fallback" in out.stderr and "no C++ compiler" in out.stderr and "apt-get install g++" in out.stderr
    never = _run([venv.bin / "petal-fast", "info", "--require-fast"],
                 venv.env(tmp_path / "empty-cache", PETAL_FAST_BUILD="never"), venv.work)
    assert never.returncode == 1 and "PETAL_FAST_BUILD=never" in never.stderr
    assert not (tmp_path / "empty-cache").exists() or not list((tmp_path / "empty-cache").glob("torch-*"))


def test_wheel_sdist_and_editable_routes_carry_the_sources(venv, first_use, tmp_path):
    """``pip wheel .`` and an sdist contain csrc/; installing either, or ``pip install -e .``, loads
    the ops from the same cache entry (same sources, same torch): no second build."""
    _ok(first_use[0])
    venv.pip("wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"), str(venv.src))
    wheel = next((tmp_path / "wheels").glob("petal_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"petal_fast/csrc/petal_linear.cpp", "petal_fast/csrc/hash32.h", "petal_fast/_build.py"} <= set(names)
    assert not [n for n in names if n.startswith("petal_fast/_C")]
    venv.pip("install", "-q", "build")
    _ok(_run([venv.python, "-m", "build", "--sdist", "-o", tmp_path / "sdist", venv.src], venv.env(tmp_path / "c"),
             venv.work, timeout=900))
    sdist = next((tmp_path / "sdist").glob("petal_fast-*.tar.gz"))
    members = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {"csrc/petal_linear.cpp", "csrc/hash32.h", "csrc/module.cpp", "petal_fast/_build.py"} <= members
    for route in (["install", "-q", "--no-deps", "--force-reinstall", str(sdist)],
                  ["install", "-q", "--no-deps", "-e", str(venv.src)]):
        venv.pip(*route)
        out = _ok(_run([venv.bin / "petal-fast", "info", "--require-fast"], venv.env(first_use[1]), venv.work))
        assert BUILD_LINE not in out.stderr and "just-in-time build (user cache)" in out.stdout, route
    assert venv.site_package() == venv.src / "petal_fast"  # the editable install is the one in place now


def _broken_library(path: Path, tmp: Path) -> None:
    """A shared library that needs a symbol no torch defines: loading it fails as an ABI mismatch does."""
    c = tmp / "broken.c"
    c.write_text("extern void at_symbol_of_another_torch(void);\nvoid petal_fast_probe(void) { at_symbol_of_another_torch(); }\n")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("c++")
    _ok(_run([cc, "-shared", "-fPIC", "-o", path, c], os.environ, tmp))
