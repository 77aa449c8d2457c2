"""The CUDA host path of petal_fast's ops, run on a machine without a GPU (issue 21's instruments).

Everything our Python code, torch and Triton do on the host before a CUDA kernel starts runs for
real; only what needs the device is stubbed. Two modes:

``fake_cuda()`` — counting. CUDA tensors are fake tensors (``FakeTensorMode``: shapes, dtypes,
strides, no data). The few CUDA queries our code and Triton make answer as an H100 (capability
(9, 0), 132 SMs, one device, current device 0). Triton's active driver is a stub: ``kernel[grid](...)``
goes through the real ``JITFunction.run`` (argument binding, specialisation, cache key, and the real
compile for sm_90a on first use), and only the binary load and the launch are stubbed; each launch
is recorded (kernel, grid, constexprs). A ``TorchDispatchMode`` records every aten op on CUDA tensors
that launches a CUDA kernel (all but allocations, views and metadata ops) and every host↔device
synchronisation or CPU tensor in the CUDA path: ``aten._local_scalar_dense`` (``.item()``,
``bool(t)``), copies between CPU and CUDA (a pageable host→device copy synchronises too),
data-dependent ops (``nonzero`` and every op tagged with a data-dependent output), and any op with
a CPU tensor in it (a Python scalar is no tensor and is fine; a 0-dim CPU tensor is not). A custom
operator (``torch.library.custom_op`` / ``triton_op``) runs its registered CUDA implementation,
as the dispatcher would on a GPU. ``strict=True`` raises :class:`HostPathViolation` at the offending
op with its Python stack; otherwise the :class:`HostPathReport` lists everything::

    with fake_cuda() as cuda:
        layer = PetalLinear(384, 1152, device="cuda")           # setup: not recorded
        x = torch.randn(3200, 384, device="cuda", requires_grad=True)
        with cuda.record(strict=False) as report:
            y = layer(x, alpha=alpha)
        print(report.summary())

How this works on a CPU build of torch: the fake tensors tell Python code they are on ``cuda`` but
tell C++ (the autograd engine) they are on ``meta`` (the mode answers ``prim.device``), so backward
runs on the calling thread, as on the CPU (a GPU runs it on the device's autograd thread), and the
engine's zero gradients come back as CUDA tensors. A stub CUDA device guard
(``cuda_stub_guard.cpp``, built on first use in ~2 s) answers "device 0" where ATen needs one
(``t.to("cuda")``). The fake mode is pushed only while an op runs, so our code never sees it
(``torch._guards.detect_fake_mode()`` is None, as with real CUDA tensors). Work on CPU tensors alone
runs for real (values, µs). Where the path reads a value a fake tensor does not hold, counting mode
goes on with a placeholder (True, 0, 1.0; a data-dependent op as if its inputs were zeros).

``standin_cuda()`` — timing. Fake tensors cost ~10–50 µs of dispatch per op, which would swamp a
≤ 100 µs host budget, so for µs the same ops run on real CPU tensors standing in for the CUDA
ones: petal_fast's Triton backend forced (``use_backend("triton")``; petal_fast lets it take CPU
tensors under ``TRITON_INTERPRET=1``, which is set for petal_fast while Triton's own switch stays
off, so the kernels stay JIT functions), the real ``JITFunction.run`` binder on the stub driver,
the launch stubbed. What differs from a GPU host, and in which direction:

- allocations: glibc malloc kept warm (no mmap, no trim: a freed block is reused, like the CUDA
  caching allocator; ~1–10 µs here against ~1–3 µs);
- ops with data: a stand-in op does its real work on the CPU (one thread), where a GPU pays one
  launch (~3–5 µs host): copies, zero fills and casts of the M-independent (N × R, R × K) buffers
  cost ~5–150 µs each here, so a path that still has them reads slower than on a GPU;
- not counted: the C launcher's argument packing and ``cuLaunchKernelEx`` (~2–5 µs a launch), the
  autograd engine's hand-off to the CUDA device thread in backward, and any wait a host sync adds
  (``fake_cuda`` finds those);
- device-dependent choices in our code see a CPU device (``kernels/petal_linear_config``: the
  interpreter's tile table and design, no capability query); the benchmark forces the Hopper
  design, so the launch sequence matches an H100's.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                          FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
_HARNESS = str(Path(__file__).resolve())


# -- the device the stubs describe ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StubDevice:
    """What the CUDA queries answer while a stub is active."""
    name: str = "NVIDIA H100 80GB HBM3 (stub)"
    capability: tuple[int, int] = (9, 0)
    multi_processor_count: int = 132
    total_memory: int = 80 * 2**30
    max_shared_mem: int = 232448       # bytes per block (227 KiB) on sm_90
    max_threads_per_block: int = 1024

    def properties(self) -> SimpleNamespace:
        """``torch.cuda.get_device_properties`` as our code and torch read it."""
        major, minor = self.capability
        return SimpleNamespace(name=self.name, major=major, minor=minor, total_memory=self.total_memory,
                               multi_processor_count=self.multi_processor_count, is_integrated=False,
                               is_multi_gpu_board=False, warp_size=32, L2_cache_size=50 * 2**20,
                               max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
                               gcnArchName="", uuid="stub")


H100 = StubDevice()


# -- what a run records ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Launch:
    """One Triton kernel launch that reached the (stubbed) driver."""
    kernel: str
    grid: tuple[int, int, int]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class HostEvent:
    """An aten op of the CUDA path: a kernel launch, a host↔device sync or a CPU tensor."""
    kind: str            # "kernel" | "sync" | "cpu_tensor"
    op: str              # e.g. "aten.isfinite.default"
    what: str            # why it is recorded, in words
    stack: tuple[str, ...]  # "path:line in function", outermost first, torch/triton frames left out

    def where(self) -> str:
        """The innermost frame of our code (or the caller's) that issued the op."""
        return self.stack[-1] if self.stack else "?"

    def describe(self, frames: int = 6) -> str:
        lines = [f"{self.op}: {self.what}"] + [f"    {f}" for f in self.stack[-frames:]]
        return "\n".join(lines)


@dataclasses.dataclass
class HostPathReport:
    """Everything one ``record()`` block did on the CUDA host path."""
    launches: list[Launch] = dataclasses.field(default_factory=list)
    kernels: list[HostEvent] = dataclasses.field(default_factory=list)
    syncs: list[HostEvent] = dataclasses.field(default_factory=list)
    cpu_tensors: list[HostEvent] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.launches)} Triton launches ({', '.join(l.kernel for l in self.launches) or '-'}), "
                 f"{len(self.kernels)} other CUDA kernels, {len(self.syncs)} host syncs, "
                 f"{len(self.cpu_tensors)} CPU-tensor ops"]
        for title, events in (("CUDA kernels", self.kernels), ("host syncs", self.syncs),
                              ("CPU tensors", self.cpu_tensors)):
            parts += [f"{title}:"] + [f"  {e.op} @ {e.where()}  ({e.what})" for e in events] if events else []
        return "\n".join(parts)

    def as_dict(self) -> dict:
        """Plain data (JSON-serialisable) for a subprocess to hand its report to a test."""
        event = lambda e: {"op": e.op, "what": e.what, "where": e.where(), "text": e.describe()}  # noqa: E731
        return {"launches": [{"kernel": l.kernel, "grid": list(l.grid), "num_warps": l.num_warps,
                              "num_stages": l.num_stages, "constexprs": {k: repr(v) for k, v in l.constexprs.items()}}
                             for l in self.launches],
                "kernels": [event(e) for e in self.kernels], "syncs": [event(e) for e in self.syncs],
                "cpu_tensors": [event(e) for e in self.cpu_tensors]}


class HostPathViolation(AssertionError):
    """Strict mode: a host↔device synchronisation or a CPU tensor in the CUDA path."""

    def __init__(self, event: HostEvent) -> None:
        super().__init__(f"{event.kind} in the CUDA path — {event.describe(frames=12)}")
        self.event = event


def _user_stack() -> tuple[str, ...]:
    """The Python stack without torch, Triton, the standard library and this harness."""
    frames = []
    f = sys._getframe(2)
    while f is not None:
        shown = _shown_path(f.f_code.co_filename)
        if shown is not None:
            frames.append(f"{shown}:{f.f_lineno} in {f.f_code.co_name}")
        f = f.f_back
    return tuple(reversed(frames))


@functools.lru_cache(maxsize=None)
def _shown_path(filename: str) -> str | None:
    """A frame's file relative to the repository, None for frames left out of stacks."""
    if filename == _HARNESS or "site-packages" in filename or filename.startswith("<") \
            or filename.startswith((sys.prefix, sys.base_prefix)):
        return None
    try:
        return str(Path(filename).resolve().relative_to(REPO))
    except ValueError:
        return filename


# -- torch.cuda queries ----------------------------------------------------------------------------
@functools.cache
def _guard_library() -> ctypes.CDLL:
    """benchmarks/cuda_stub_guard.cpp, built on first use (~2 s; torch's extension cache)."""
    from torch.utils.cpp_extension import load
    path = load("petal_fast_cuda_stub_guard", [str(Path(__file__).with_name("cuda_stub_guard.cpp"))],
                is_python_module=False, verbose=False)
    return ctypes.CDLL(path)


@contextlib.contextmanager
def cuda_device_guard() -> Iterator[None]:
    """A CUDA device guard (one device, one stream) while active; nothing on a CUDA build."""
    lib = _guard_library()
    installed = lib.petal_fast_stub_cuda_guard_install() == 1
    try:
        yield
    finally:
        if installed:
            lib.petal_fast_stub_cuda_guard_uninstall()


@contextlib.contextmanager
def cuda_queries(device: StubDevice = H100, on_sync: Callable[[str], None] | None = None) -> Iterator[None]:
    """Make ``torch.cuda``'s queries answer as ``device`` (one device, current device 0, one stream, not
    capturing); ``torch.cuda.synchronize`` and ``Stream.synchronize`` call ``on_sync`` (a host sync)."""
    props = device.properties()
    cuda = torch.cuda
    synchronize = (lambda d=None: on_sync("torch.cuda.synchronize()")) if on_sync else (lambda d=None: None)
    stream = SimpleNamespace(cuda_stream=0, device=torch.device("cuda", 0), device_index=0,
                             synchronize=(lambda: on_sync("Stream.synchronize()")) if on_sync else (lambda: None))
    stubs = {
        "is_available": lambda: True, "is_initialized": lambda: True, "_lazy_init": lambda: None,
        "device_count": lambda: 1, "current_device": lambda: 0, "set_device": lambda d: None,
        "get_device_capability": lambda d=None: device.capability, "get_device_properties": lambda d=None: props,
        "get_device_name": lambda d=None: device.name, "is_bf16_supported": lambda *a, **k: True,
        "current_stream": lambda d=None: stream, "default_stream": lambda d=None: stream,
        "is_current_stream_capturing": lambda: False, "synchronize": synchronize,
    }
    saved = {name: getattr(cuda, name) for name in stubs}
    for name, fn in stubs.items():
        setattr(cuda, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cuda, name, fn)


# -- Triton: a driver whose launches are recorded, not run -----------------------------------------
_sink = threading.local()  # .launches: the list launches go to (None: dropped)


def _record_launch(launch: Launch) -> None:
    launches = getattr(_sink, "launches", None)
    if launches is not None:
        launches.append(launch)


@contextlib.contextmanager
def recorded_launches(launches: list[Launch] | None = None) -> Iterator[list[Launch]]:
    """Collect the stubbed launches made inside the block (in this thread) into a list."""
    previous = getattr(_sink, "launches", None)
    _sink.launches = launches if launches is not None else []
    try:
        yield _sink.launches
    finally:
        _sink.launches = previous


class _StubUtils:
    """``driver.utils`` as ``CompiledKernel`` uses it: no module is loaded."""

    def __init__(self, device: StubDevice) -> None:
        self.device = device

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, self.device.max_threads_per_block  # module, function, n_regs, n_spills, max threads

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.device.max_shared_mem,
                "multiprocessor_count": self.device.multi_processor_count, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Launcher:
    """Takes the place of Triton's CUDA launcher: records the launch instead of calling cuLaunchKernelEx."""

    def __init__(self, src, metadata) -> None:
        fn = getattr(src, "fn", None)
        self.kernel = getattr(fn, "__name__", str(src))
        names = getattr(fn, "arg_names", None) or []
        constants = getattr(src, "constants", {}) or {}
        self.constexprs = {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 and k[0] < len(names) else str(k)): v
                           for k, v in constants.items()}
        self.num_warps = getattr(metadata, "num_warps", 0)
        self.num_stages = getattr(metadata, "num_stages", 0)

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args) -> None:
        _record_launch(Launch(self.kernel, (int(grid_x), int(grid_y), int(grid_z)), self.constexprs,
                              self.num_warps, self.num_stages))


def _stub_driver(device: StubDevice):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver

    class StubCudaDriver(GPUDriver):
        """Triton's active driver: an sm_XY target (so the real compiler runs), device 0, stream 0."""

        def __init__(self) -> None:  # GPUDriver.__init__ would bind torch.cuda's functions: not ours
            self.utils = _StubUtils(device)
            self.launcher_cls = _Launcher
            self.get_device_capability = lambda d=None: device.capability
            self.get_current_stream = lambda d=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda d: None

        @staticmethod
        def is_active() -> bool:
            return True

        def get_current_target(self):
            major, minor = device.capability
            return GPUTarget("cuda", major * 10 + minor, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        def get_benchmarker(self):
            raise RuntimeError("the stub CUDA driver cannot time kernels")

    return StubCudaDriver()


class _StubCompiledKernel:
    """A compiled kernel without the compiler (``compile=False``): what ``JITFunction.run`` uses of it."""

    def __init__(self, fn, constexprs: dict, options) -> None:
        names = fn.arg_names
        src = SimpleNamespace(fn=fn, constants={(k[0],) if isinstance(k, tuple) else (names.index(k),): v
                                                for k, v in constexprs.items()})
        meta = SimpleNamespace(num_warps=options.num_warps, num_stages=options.num_stages)
        self.name = fn.__name__
        self.function = 1
        self.packed_metadata = None
        self.run = _Launcher(src, meta)

    def launch_metadata(self, grid, stream, *args):
        return None


@contextlib.contextmanager
def triton_stub(device: StubDevice = H100, compile: bool = True) -> Iterator[None]:
    """Make Triton's active driver the stub (launches recorded, not run). ``compile=False`` also skips
    the compiler (binding, specialisation and the cache key stay real): for tests that must stay cheap."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1" and not _interpret_pinned_off():
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted functions, not JIT functions; "
                           "run the CUDA host path stub in a process without it")
    previous = driver._active  # reset_active() would build the real CUDA driver: none here
    driver.set_active(_stub_driver(device))
    stubbed: list[tuple[dict, object]] = []
    original = JITFunction._do_compile
    if not compile:
        def _do_compile(self, key, signature, device_index, constexprs, options, attrs, warmup):
            kernel_cache = self.device_caches[device_index][0]
            kernel = kernel_cache[key] = _StubCompiledKernel(self, constexprs, options)
            stubbed.append((kernel_cache, key))
            return kernel
        JITFunction._do_compile = _do_compile
    try:
        yield
    finally:
        JITFunction._do_compile = original
        for cache, key in stubbed:  # a later real run must compile these
            cache.pop(key, None)
        driver._active = previous


def _interpret_pinned_off() -> bool:
    from triton import knobs
    return "interpret" in knobs.runtime.__dict__ and not knobs.runtime.__dict__["interpret"]


# -- counting mode ---------------------------------------------------------------------------------
aten = torch.ops.aten
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                aten.new_empty.default, aten.new_empty_strided.default, aten.empty_permuted.default,
                aten.resize_.default}
_METADATA = {aten.detach.default, aten.alias.default, aten.lift_fresh.default, aten._unsafe_view.default,
             aten.record_stream.default, aten._assert_tensor_metadata.default, aten.set_.source_Storage,
             aten.set_.source_Storage_storage_offset, aten.sym_size.int, aten.sym_stride.int,
             aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_same_size.default,
             aten._has_compatible_shallow_copy_type.default}
_HOST_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
_DATA_DEPENDENT = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


_CUDA = torch.device("cuda", 0)


def _device_of(t: torch.Tensor) -> torch.device:
    return t.fake_device if isinstance(t, FakeTensor) else t.device


def _is_cuda(d: torch.device | str | None) -> bool:
    return d is not None and torch.device(d).type == "cuda"


class _FakeCudaMode(FakeTensorMode):
    """Fake tensors whose constant folding never tries the (absent) CUDA device, whatever
    ``torch.cuda.is_available()`` answers while the stubs are active."""
    avoid_device_init = True


class _Recorder(TorchDispatchMode):
    """Classifies the aten ops of the CUDA path, runs custom operators' CUDA implementations, and hands
    every op to the fake mode it holds, pushed only while that op runs (our code never sees it:
    ``detect_fake_mode()`` finds none)."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.report: HostPathReport | None = None  # None: not recording
        self.strict = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return torch.device("meta")  # C++ (the autograd engine) sees meta; Python sees t.fake_device
        by_engine = isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "meta"
        if by_engine:  # the autograd engine makes tensors (zero gradients) on the device it saw: meta
            kwargs = {**kwargs, "device": _CUDA}
        if self.report is not None:
            self._classify(func, args, kwargs, by_engine)
        if func in _HOST_READS and isinstance(args[0], FakeTensor) and args[0].constant is None:
            return _placeholder(args[0].dtype)  # recorded above (strict mode raised); the run goes on
        if func is aten.uniform_.default and isinstance(args[0], FakeTensor):
            return args[0]  # no values to fill; the fake mode's decomposition would need a CUDA build
        if func.overloadpacket is aten.to:
            return self._to(func, args, kwargs)
        impl = _cuda_impl(func, args, kwargs)
        if impl is not None:
            with self:  # the operator's body is CUDA host path too
                return impl(*args, **kwargs)
        if _host_only(args, kwargs):
            return func(*args, **kwargs)  # real CPU tensors stay real (values, and µs instead of ms)
        try:
            with self.fake_mode:  # pushed only for the op (its decompositions create tensors on it)
                return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return self._on_zeros(func, args, kwargs)  # recorded as a sync above; not strict: go on

    def _on_zeros(self, func, args, kwargs):
        """A data-dependent op's output as if every fake input held zeros (``nonzero``: empty)."""
        real_args, real_kwargs = pytree.tree_map_only(FakeTensor, lambda t: torch.zeros(t.shape, dtype=t.dtype),
                                                      (args, kwargs))
        out = func(*real_args, **real_kwargs)
        converter = self.fake_mode.fake_tensor_converter
        return pytree.tree_map_only(torch.Tensor, lambda t: converter.from_meta_and_device(
            self.fake_mode, t.to("meta"), _CUDA), out)

    def _to(self, func, args, kwargs):
        """``aten.to`` as ATen runs it: its input when nothing changes, else ``_to_copy`` (which the fake
        mode never constant-folds onto the absent device, unlike ``to`` of a real CPU tensor)."""
        src, dst, copies = _copy_route(func, args, kwargs)
        bound = _bind(func, args, kwargs)
        if not copies:
            return bound["self"]
        other = bound.get("other")
        options = {"dtype": bound.get("dtype") or (other.dtype if other is not None else bound["self"].dtype),
                   "device": dst, "non_blocking": bool(bound.get("non_blocking"))}
        if bound.get("memory_format") is not None:
            options["memory_format"] = bound["memory_format"]
        if dst.type == "cpu" and _host_only(args, kwargs):
            return aten._to_copy.default(bound["self"], **options)
        with self.fake_mode:
            return aten._to_copy.default(bound["self"], **options)

    def _event(self, kind: str, func, what: str) -> None:
        event = HostEvent(kind, str(func), what, _user_stack())
        if kind != "kernel" and self.strict:
            raise HostPathViolation(event)
        events = {"kernel": self.report.kernels, "sync": self.report.syncs, "cpu_tensor": self.report.cpu_tensors}
        events[kind].append(event)

    def _classify(self, func, args, kwargs, by_engine: bool = False) -> None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = [_device_of(t) for t in tensors]
        target = kwargs.get("device")
        cuda = any(d.type == "cuda" for d in devices) or _is_cuda(target)
        cpu = [t for t, d in zip(tensors, devices) if d.type == "cpu"]
        if func in _HOST_READS and cuda:
            return self._event("sync", func, "device→host read of a value (.item(), bool(t), int(t))")
        route = _copy_route(func, args, kwargs)
        if route is not None and {route[0].type, route[1].type} == {"cpu", "cuda"}:
            direction = "host→device" if route[1].type == "cuda" else "device→host"
            return self._event("sync", func, f"{direction} copy (from pageable memory: synchronises the stream)")
        if cuda and _data_dependent(func, args):
            return self._event("sync", func, "data-dependent output: the host waits for the device")
        if cpu or (not cuda and target is not None and torch.device(target).type == "cpu"):
            shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in cpu) or "new tensor"
            where = "mixed into CUDA work" if cuda else "CPU work in the CUDA path"
            return self._event("cpu_tensor", func, f"CPU tensor ({shapes}) {where}")
        if cuda and (route[2] if route is not None else _launches_kernel(func)):
            self._event("kernel", func, "launches a CUDA kernel" + (
                " (made by the autograd engine: a zero gradient for an output that got none)" if by_engine else ""))


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _copy_route(func, args, kwargs) -> tuple[torch.device, torch.device, bool] | None:
    """(source device, destination device, does it copy) of a copy or conversion op; None for others.
    ``aten.to`` aliases its input when nothing changes (no kernel then)."""
    if func in (aten.copy_.default, aten._copy_from_and_resize.default, aten._copy_from.default):
        dst, src = (args[1], args[0]) if func is not aten.copy_.default else (args[0], args[1])
        return _device_of(src), _device_of(dst), True
    if func.overloadpacket not in (aten.to, aten._to_copy):
        return None
    bound = _bind(func, args, kwargs)
    src, other = bound["self"], bound.get("other")
    device = bound.get("device") or (_device_of(other) if other is not None else _device_of(src))
    dtype = bound.get("dtype") or (other.dtype if other is not None else src.dtype)
    device = torch.device(device)
    moves = device.type != _device_of(src).type
    return _device_of(src), device, bool(func is aten._to_copy.default or bound.get("copy") or moves
                                         or dtype != src.dtype)


def _data_dependent(func, args) -> bool:
    """Whether the op's output shape depends on values (the host must wait for them): ``nonzero``,
    ``unique``, ...; indexing only with a boolean mask (integer indices give a known shape)."""
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    return any(tag in func.tags for tag in _DATA_DEPENDENT)


def _host_only(args, kwargs) -> bool:
    """No fake tensor among the arguments and nothing made on CUDA: a plain CPU op."""
    target = kwargs.get("device")
    if target is not None and torch.device(target).type != "cpu":
        return False
    return not any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, kwargs)))


def _placeholder(dtype: torch.dtype) -> bool | int | float:
    """What a host read of a value that a fake tensor does not hold returns (counting mode goes on):
    True (checks pass), 0 (counts of bad values), 1.0 (no division by zero)."""
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else 0


def _launches_kernel(func) -> bool:
    if func in _ALLOCATIONS or func in _METADATA or getattr(func, "is_view", False):
        return False
    return func.namespace in ("aten", "prims")


def _cuda_impl(func, args, kwargs) -> Callable | None:
    """The CUDA kernel of a ``torch.library.custom_op`` / ``triton_op`` (a Python function), if ``func``
    is one and any tensor argument is on CUDA: what the dispatcher calls on a GPU."""
    if func.namespace in ("aten", "prims", "prim"):
        return None
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get(f"{func.namespace}::{func._schema.name.split('::')[-1]}")
    if opdef is None:
        return None
    if not any(_is_cuda(_device_of(t)) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
        return None
    return opdef._backend_fns.get("cuda") or opdef._backend_fns.get(None)


@dataclasses.dataclass
class FakeCuda:
    """The handle ``fake_cuda()`` yields: ``record()`` blocks are checked, the rest is setup."""
    recorder: _Recorder

    @contextlib.contextmanager
    def record(self, strict: bool = True) -> Iterator[HostPathReport]:
        """Record the CUDA host path inside the block (Triton launches, CUDA kernels, syncs, CPU
        tensors); ``strict``: raise :class:`HostPathViolation` at the first sync or CPU tensor."""
        report = HostPathReport()
        previous = (self.recorder.report, self.recorder.strict)
        self.recorder.report, self.recorder.strict = report, strict
        try:
            with recorded_launches(report.launches):
                yield report
        finally:
            self.recorder.report, self.recorder.strict = previous


@contextlib.contextmanager
def fake_cuda(device: StubDevice = H100, compile: bool = True) -> Iterator[FakeCuda]:
    """Counting mode (module docstring): CUDA tensors are fake, the CUDA queries and Triton's driver
    answer as ``device``; ``compile=False`` skips Triton's compiler (see ``triton_stub``)."""
    fake_mode = _FakeCudaMode(allow_non_fake_inputs=True)
    recorder = _Recorder(fake_mode)
    handle = FakeCuda(recorder)

    def on_sync(what: str) -> None:
        if recorder.report is not None:
            recorder._event("sync", "torch.cuda.synchronize", what)

    patched = {"data_ptr": lambda self: 1 << 20,  # 16-aligned: the binder specialises pointers on alignment
               "is_cuda": property(lambda self: self.fake_device.type == "cuda"),
               "get_device": lambda self: self.fake_device.index if self.fake_device.type == "cuda" else -1}
    saved = {name: FakeTensor.__dict__.get(name) for name in patched}
    for name, value in patched.items():
        setattr(FakeTensor, name, value)
    lift_cpu = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)  # torch.tensor(data, device="cuda"): a CPU tensor, then a copy
    try:
        with cuda_device_guard(), cuda_queries(device, on_sync), triton_stub(device, compile), recorder:
            yield handle
    finally:
        torch._C._set_only_lift_cpu_tensors(lift_cpu)
        for name, value in saved.items():
            if value is None:
                delattr(FakeTensor, name)
            else:
                setattr(FakeTensor, name, value)


# -- timing mode -----------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


@contextlib.contextmanager
def _warm_malloc() -> Iterator[None]:
    """glibc malloc without mmap and trimming: a freed block is reused on the next allocation, as the
    CUDA caching allocator reuses its blocks (a 100 MB ``torch.empty`` costs ~1 µs instead of ~25)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: allocations keep their mmap cost
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**62)
    libc.mallopt(_M_TOP_PAD, 256 << 20)
    try:
        yield
    finally:  # glibc's defaults
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        libc.mallopt(_M_TOP_PAD, 128 << 10)


@contextlib.contextmanager
def _petal_fast_triton_on_cpu() -> Iterator[None]:
    """petal_fast's Triton backend on CPU tensors: ``TRITON_INTERPRET=1`` for petal_fast (its documented
    switch), Triton's own interpret knob pinned off (kernels stay JIT functions, compiled for the stub)."""
    from triton import knobs

    from petal_fast import use_backend
    before = os.environ.get("TRITON_INTERPRET")
    knobs.runtime.interpret = False  # also writes TRITON_INTERPRET=0
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with use_backend("triton"):
            yield
    finally:
        del knobs.runtime.interpret
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


@contextlib.contextmanager
def standin_cuda(device: StubDevice = H100) -> Iterator[None]:
    """Timing mode (module docstring): run on CPU tensors standing in for CUDA ones, petal_fast's Triton
    backend forced, the real binder on the stub driver (``recorded_launches`` collects launches). One
    intra-op thread: the host path is one thread, and the stand-ins' data work should not fan out.
    ``torch.cuda`` is left as it is: code on CPU tensors does not ask it anything."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with triton_stub(device), _petal_fast_triton_on_cpu(), _warm_malloc():
            yield
    finally:
        torch.set_num_threads(threads)
