"""torch.compile(fullgraph=True) of the PETALface model: no graph breaks, eager numerics, dynamic batch.

Compiling is the slow part on a 2-core CPU, so the model is the smallest PETALface that still has
every layer type (20 px, patch 2: a 10×10 stage of a plain and a shifted-window block with its mask,
patch merging, a 5×5 stage of one window, the feature head with its LoRA, BRISQUE → α), and each
compiled module is built once per test module (fixtures below): Inductor for inference; AOTAutograd
with eager kernels (``aot_eager``: the same graph capture, fake tensors and compiled backward,
without C++ code generation) for the training step, plus one Inductor training step.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from conftest import HAS_CUDA, rel_err
from petal_fast.models import PetalFace, face_swin

BATCHES = (2, 5)  # never 1: torch.compile specialises sizes 0 and 1
SIZE = 20


def small_petalface(quality="brisque", dropout: float = 0.1, device: str = "cpu",
                    stochastic: bool = True) -> PetalFace:
    """The small backbone of the compile tests (module docstring), random adapters (B ≠ 0).
    ``stochastic=False``: no drop path and no feature dropout in the backbone (deterministic training)."""
    torch.manual_seed(0)
    backbone = face_swin(img_size=SIZE, patch_size=2, embed_dim=32, depths=[2, 1], num_heads=[2, 4],
                         window_size=5, embedding_size=64, drop_path_rate=0.1 if stochastic else 0.0,
                         feature_dropout=0.25 if stochastic else 0.0)
    model = PetalFace(backbone, num_classes=10, quality=quality, dropout=dropout).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def images(batch: int, device: str = "cpu") -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, device=device) * 2 - 1


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def eval_model():
    return small_petalface().eval()


@pytest.fixture(scope="module")
def compiled_inference(eval_model):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    return torch.compile(eval_model, fullgraph=True, dynamic=True, backend=counter), counter


@pytest.fixture(scope="module")
def train_model():
    return small_petalface().train()


@pytest.fixture(scope="module")
def compiled_training(train_model):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(train_model, fullgraph=True, dynamic=True, backend=counter), counter


# --- graph breaks ---------------------------------------------------------------------------------
def test_no_graph_breaks_inference_with_alpha_from_quality(eval_model):
    """Embedding with α from BRISQUE (the default PetalFace) and with α passed in: one graph each."""
    for kwargs in ({}, {"alpha": torch.rand(3)}):
        ex = torch._dynamo.explain(eval_model)(images(3), **kwargs)
        assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
        assert ex.graph_count == 1


def test_no_graph_breaks_training_step(train_model):
    """Forward + fused margin loss (dropout on: seeds are tensors) is one graph; AOTAutograd derives
    the backward from it (through the operators' registered autograd)."""
    ex = torch._dynamo.explain(train_model)(images(4), torch.randint(0, 10, (4,)))
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1


# --- numerics and recompiles -------------------------------------------------------------------------
def test_compiled_inference_matches_eager_without_recompiling(eval_model, compiled_inference):
    compiled, counter = compiled_inference
    frames = []
    with torch.no_grad():
        for b in BATCHES:
            x, alpha = images(b), torch.rand(b)
            assert rel_err(compiled(x), eval_model(x)) < 1e-5                       # α from BRISQUE
            assert rel_err(compiled(x, alpha=alpha), eval_model(x, alpha=alpha)) < 1e-5
            frames.append(counter.frame_count)
    assert frames[0] >= 2 and frames == [frames[0]] * len(BATCHES)  # graphs per call signature, none per batch


def test_compiled_training_matches_eager_without_recompiling(train_model, compiled_training):
    """Loss and every gradient of the compiled step equal eager's (same dropout seeds), batch sizes vary."""
    compiled, counter = compiled_training
    for b in BATCHES:
        x, y = images(b), torch.randint(0, 10, (b,))
        state = torch.get_rng_state()
        train_model.zero_grad(set_to_none=True)
        loss_eager = train_model(x, y)
        loss_eager.backward()
        expect = grads(train_model)
        torch.set_rng_state(state)
        train_model.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        loss.backward()
        got = grads(train_model)
        assert rel_err(loss, loss_eager) < 1e-5
        assert got.keys() == expect.keys() and len(got) > 0
        for name in expect:
            assert rel_err(got[name], expect[name]) < 1e-4, name
        frames = counter.frame_count if b == BATCHES[0] else frames
    assert counter.frame_count == frames


def test_compiled_training_step_with_optimizer(train_model, compiled_training):
    """forward → fused margin loss → backward → AdamW (compiled step): the loss goes down, no recompile."""
    compiled, counter = compiled_training
    frames = counter.frame_count
    params = [p for p in train_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    # torch.optim's step has deliberate graph breaks (torch._dynamo.graph_break() in Optimizer's
    # _use_grad, so that AOTAutograd sees a no-grad update): compiled as PyTorch's recipe does, not
    # fullgraph (petal_fast.training.trainer's docstring)
    step = torch.compile(opt.step, backend="eager")
    x, y = images(4), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        loss = compiled(x, y)
        loss.backward()
        step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert counter.frame_count == frames


def test_bad_values_raise_when_compiled(eval_model, compiled_inference, train_model, compiled_training):
    """A non-finite α or label out of range: the same ValueError compiled as in eager mode, raised inside
    the operator (on CPU the values are on the host; on CUDA it would be a device-side assert)."""
    compiled, _ = compiled_inference
    x, alpha = images(2), torch.tensor([0.5, float("nan")])
    with torch.no_grad():
        with pytest.raises(ValueError, match="non-finite"):
            eval_model(x, alpha=alpha)
        with pytest.raises(ValueError, match="non-finite"):
            compiled(x, alpha=alpha)
    compiled_train, _ = compiled_training
    with pytest.raises(ValueError, match="labels must be in"):
        train_model(images(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels must be in"):
        compiled_train(images(2), torch.tensor([0, 10]))


def test_inductor_training_step_matches_eager():
    """The whole step through Inductor (forward and backward code generated): every dropout and drop path off
    so that the compiled graph's random numbers do not matter; static shapes (the compile is the slow part)."""
    model = small_petalface(dropout=0.0, stochastic=False).train()
    compiled = torch.compile(model, fullgraph=True)
    x, y = images(3), torch.randint(0, 10, (3,))
    loss_eager = model(x, y)
    loss_eager.backward()
    expect = grads(model)
    model.zero_grad(set_to_none=True)
    loss = compiled(x, y)
    loss.backward()
    assert rel_err(loss, loss_eager) < 1e-5
    for name, g in grads(model).items():
        assert rel_err(g, expect[name]) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_compiled_matches_eager_triton_path():
    """CUDA: the Triton backend inside a compiled graph, inference and a training step, dynamic batch."""
    model = small_petalface(quality=0.6, dropout=0.0, device="cuda", stochastic=False)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for b in BATCHES:
        x, y, alpha = images(b, "cuda"), torch.randint(0, 10, (b,), device="cuda"), torch.rand(b, device="cuda")
        model.eval()
        with torch.no_grad():
            assert rel_err(compiled(x, alpha=alpha), model(x, alpha=alpha)) < 3e-3
        model.train()
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        expect = grads(model)
        model.zero_grad(set_to_none=True)
        compiled(x, y).backward()
        for name, g in grads(model).items():
            assert rel_err(g, expect[name]) < 3e-3, name


def test_backend_choice_is_a_guard():
    """The backend (``use_backend`` / PETAL_FAST_BACKEND) is read while tracing and guarded: switching it
    recompiles onto the new backend instead of silently reusing the old graph."""
    import petal_fast
    from petal_fast import PetalLinear
    from petal_fast.ops.petal_linear import library as lib
    layer = PetalLinear(8, 6, rank=2)
    torch.nn.init.normal_(layer.lora_B)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x, alpha = torch.randn(4, 3, 8), torch.rand(4)
    seen = []
    real = lib.forward_impl
    lib_op = lib.fused_petal_linear
    def spy(*args):  # the operator's body records the backend it runs
        seen.append(args[10])
        return real(*args)
    try:
        lib.forward_impl = spy
        for name in ("cpp", "torch", "cpp"):
            with petal_fast.use_backend(name), torch.no_grad():
                torch.testing.assert_close(compiled(x, alpha=alpha), layer(x, alpha=alpha))
    finally:
        lib.forward_impl = real
    assert lib_op is lib.fused_petal_linear
    assert seen == ["cpp", "torch", "cpp"]  # the compiled calls (eager inference skips the dispatcher)
    assert counter.frame_count == 2
