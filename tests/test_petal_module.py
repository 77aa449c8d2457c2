"""PetalLinear as a module: init, from_linear, the quality context, injection, adapters, merge."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import petal_fast
from petal_fast import PetalLinear, adapter_state_dict, inject_petal, load_adapter_state_dict, alpha_scope
from petal_fast.reference import petal_linear as ref_petal_linear
from conftest import rel_err


def randomise_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PetalLinear):
                m.lora_A.normal_(0, 0.3)
                m.lora_B.normal_(0, 0.3)


def test_init_equals_base_and_params_frozen():
    layer = PetalLinear(12, 7, rank=3)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (2, 3, 12) and layer.lora_B.shape == (2, 7, 3)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(layer(x, alpha=torch.rand(4)), nn.functional.linear(x, layer.weight, layer.bias))


def test_from_linear_reuses_weight():
    lin = nn.Linear(10, 6)
    layer = PetalLinear.from_linear(lin, rank=2, branches=1)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad
    with pytest.raises(TypeError, match="nn.Linear"):
        PetalLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_quality_context_and_explicit_alpha():
    layer = PetalLinear(8, 5, rank=2)
    randomise_adapters(layer)
    model = nn.Sequential(nn.Identity(), layer)
    x, a1, a2 = torch.randn(3, 4, 8), torch.rand(3), torch.rand(3)
    expect1 = ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, a1, 1.0)
    expect2 = ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, a2, 1.0)
    with alpha_scope(a1):
        torch.testing.assert_close(model(x), expect1)
        with alpha_scope(a2):  # innermost wins
            torch.testing.assert_close(model(x), expect2)
        torch.testing.assert_close(layer(x, alpha=a2), expect2)  # explicit beats the context
        assert layer.last_alpha is a2  # the α the layer used, visible on it
        model(x)
        assert layer.last_alpha is a1
    assert PetalLinear(8, 5, rank=2).last_alpha is None
    with pytest.raises(ValueError, match="petal_fast.alpha_scope"):
        model(x)
    with pytest.raises(TypeError, match="alpha must be a tensor"):
        with alpha_scope([0.5]):
            pass


def test_training_dropout_uses_fresh_seeds_and_eval_is_deterministic():
    layer = PetalLinear(16, 16, rank=4, dropout=0.5)
    randomise_adapters(layer)
    x, a = torch.randn(6, 16), torch.rand(6)
    layer.train()
    assert not torch.equal(layer(x, alpha=a), layer(x, alpha=a))
    layer.eval()
    torch.testing.assert_close(layer(x, alpha=a), ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A,
                                                                    layer.lora_B, a, 1.0))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(8, 24)
        self.attn.proj = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.attn.qkv(x).chunk(3, -1)
        return self.mlp(self.attn.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v))


@pytest.mark.parametrize("targets", ["attn.qkv", ["qkv", "mlp"], re.compile(r"attn\.(qkv|proj)$"),
                                     lambda name, m: m.out_features == 24])
def test_inject_targets_and_report(targets):
    model = nn.Sequential(TinyBlock(), TinyBlock())
    report = inject_petal(model, targets, rank=2)
    assert report.replaced and all(isinstance(model.get_submodule(n), PetalLinear) for n in report.replaced)
    expected_trainable = sum(model.get_submodule(n).lora_A.numel() + model.get_submodule(n).lora_B.numel()
                             for n in report.replaced)
    assert report.trainable == expected_trainable
    assert report.total == sum(p.numel() for p in model.parameters())
    assert 0 < report.share < 1 and "trainable" in str(report)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_petal(nn.Sequential(nn.ReLU()), "qkv")


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(cfg).eval()


class RefLoRA(nn.Module):
    """Hand-written stand-in: the original Linear plus the reference formula with given adapters."""

    def __init__(self, linear, lora_A, lora_B, scale):
        super().__init__()
        self.linear, self.lora_A, self.lora_B, self.scale = linear, lora_A, lora_B, scale

    def forward(self, x):
        return ref_petal_linear(x, self.linear.weight, self.linear.bias, self.lora_A, self.lora_B,
                                petal_fast.nn.current_alpha(), self.scale)


def test_inject_into_transformers_vit():
    """A real third-party backbone: B = 0 leaves it unchanged; random adapters match the reference."""
    model = _hf_vit()
    original = copy.deepcopy(model)
    pixels, alpha = torch.rand(3, 3, 16, 16), torch.rand(3)
    base_out = original(pixel_values=pixels).last_hidden_state
    report = inject_petal(model, ["q_proj", "k_proj", "v_proj"], rank=4, scale=0.5)
    assert len(report.replaced) == 6
    with alpha_scope(alpha):
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, base_out)
    randomise_adapters(model)
    for name in report.replaced:
        layer = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(original.get_submodule(parent), child,
                RefLoRA(original.get_submodule(name), layer.lora_A, layer.lora_B, layer.scale))
    with alpha_scope(alpha):
        got = model(pixel_values=pixels).last_hidden_state
        expect = original(pixel_values=pixels).last_hidden_state
    assert rel_err(got, expect) < 1e-5 and rel_err(got, base_out) > 1e-3
    # only adapters train
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{k}" for n in report.replaced for k in ("lora_A", "lora_B")}


def test_adapter_state_dict_round_trip():
    model = nn.Sequential(TinyBlock(), TinyBlock())
    inject_petal(model, "qkv", rank=3)
    randomise_adapters(model)
    sd = adapter_state_dict(model)
    assert set(sd) == {f"{i}.attn.qkv.{k}" for i in (0, 1) for k in ("lora_A", "lora_B")}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = nn.Sequential(TinyBlock(), TinyBlock())
    fresh.load_state_dict(model.state_dict(), strict=False)
    inject_petal(fresh, "qkv", rank=3)
    loaded = load_adapter_state_dict(fresh, torch.load(buf, weights_only=True))
    assert sorted(loaded) == sorted(sd)
    x, a = torch.randn(2, 5, 8), torch.rand(2)
    with alpha_scope(a):
        torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(fresh, {k: v for k, v in sd.items() if "0." not in k[:2]})
    with pytest.raises(KeyError, match="unexpected"):
        load_adapter_state_dict(fresh, {**sd, "2.attn.qkv.lora_A": sd["0.attn.qkv.lora_A"]})
    bad = dict(sd)
    bad["0.attn.qkv.lora_A"] = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="0.attn.qkv.lora_A"):
        load_adapter_state_dict(fresh, bad)


@pytest.mark.parametrize("branches", [1, 2])
def test_merge_and_unmerge(branches):
    layer = PetalLinear(20, 12, rank=4, scale=0.8, branches=branches)
    randomise_adapters(layer)
    w0 = layer.weight.detach().clone()
    x, a = torch.randn(5, 20), 0.3
    alpha = torch.full((5,), a)
    before = layer(x, alpha=alpha) if branches == 2 else layer(x)
    layer.merge_(a if branches == 2 else None)
    assert layer.merged
    torch.testing.assert_close(layer(x, alpha=alpha), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge_(a)
    layer.unmerge_()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    assert not layer.merged
    if branches == 2:
        with pytest.raises(ValueError, match="fixed alpha"):
            layer.merge_(None)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge_()


def test_module_bfloat16_on_cpu():
    layer = PetalLinear(32, 16, rank=4, dtype=torch.bfloat16)
    randomise_adapters(layer)
    x, a = torch.randn(3, 4, 32, dtype=torch.bfloat16, requires_grad=True), torch.rand(3)
    y = layer(x, alpha=a)
    ref = ref_petal_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                           layer.lora_B.double(), a.double(), 1.0)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2
    y.sum().backward()
    assert layer.lora_A.grad.dtype == torch.bfloat16 and torch.isfinite(layer.lora_A.grad).all()


def test_merge_and_unload_gives_a_plain_model_that_loads_weights_only(tmp_path):
    """Fold the adapters at a fixed α into plain nn.Linear layers (two-branch and one-branch), save the
    state dict, load it with weights_only=True into the untouched backbone: the same outputs."""
    torch.manual_seed(0)
    plain = nn.Sequential(TinyBlock(), TinyBlock())
    model = copy.deepcopy(plain)
    inject_petal(model, "qkv", rank=3, scale=0.7)
    inject_petal(model, "mlp", rank=2, branches=1, scale=1.5)
    randomise_adapters(model)
    x, alpha = torch.randn(4, 5, 8), 0.3
    with torch.no_grad(), alpha_scope(torch.full((4,), alpha)):
        expect = model(x)
    merged = petal_fast.merge_and_unload(model, alpha)
    assert merged is model and not any(isinstance(m, PetalLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "mlp")))
    torch.save(model.state_dict(), tmp_path / "merged.pt")
    plain.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))
    with torch.no_grad():
        assert rel_err(plain(x), expect) < 1e-5
    # a two-branch model needs α; a lone layer comes back as the Linear itself
    with pytest.raises(ValueError, match="alpha"):
        petal_fast.merge_and_unload(inject_and_return(TinyBlock()))
    layer = PetalLinear(8, 6, rank=2)
    randomise_adapters(layer)
    linear = petal_fast.merge_and_unload(layer, 1.0)
    xs = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(linear(xs), layer(xs, alpha=torch.ones(3)))


def inject_and_return(module: nn.Module) -> nn.Module:
    inject_petal(module, "qkv", rank=2)
    return module


class _CheckpointedBlock(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.block, self.use_reentrant = TinyBlock(), use_reentrant
        inject_petal(self.block, ["qkv", "proj"], rank=3, dropout=0.3)
        randomise_adapters(self.block)

    def forward(self, x, checkpointed: bool):
        if not checkpointed:
            return self.block(x)
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_backward_anywhere(use_reentrant):
    """Forward inside an alpha_scope, backward outside it or inside another scope: the recomputed forward
    uses the α and the dropout seed of the original one, so the gradients equal the uncheckpointed run's."""
    model = _CheckpointedBlock(use_reentrant).train()
    x, alpha = torch.randn(4, 6, 8, requires_grad=True), torch.rand(4)
    grads = {}
    for case in ("plain", "outside", "other_scope"):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        with alpha_scope(alpha):
            out = model(x, checkpointed=case != "plain")
        if case == "other_scope":
            with alpha_scope(torch.rand(4)):
                out.square().sum().backward()
        else:
            out.square().sum().backward()
        grads[case] = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    for case in ("outside", "other_scope"):
        for got, expect in zip(grads[case], grads["plain"]):
            torch.testing.assert_close(got, expect)


def test_two_threads_with_different_alpha():
    """alpha_scope is per thread: two threads running the same layer with different α each get their own."""
    import threading
    layer = PetalLinear(8, 5, rank=2)
    randomise_adapters(layer)
    x = torch.randn(3, 4, 8)
    alphas = [torch.rand(3) for _ in range(2)]
    expect = [ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, a, 1.0) for a in alphas]
    errors, barrier = [], threading.Barrier(2)

    def run(i: int) -> None:
        try:
            with torch.no_grad(), alpha_scope(alphas[i]):
                barrier.wait()  # both scopes open at once
                for _ in range(20):
                    torch.testing.assert_close(layer(x), expect[i])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("route", ["numpy", "data", "inplace"])
def test_alpha_changed_in_place_inside_a_scope_is_seen(route):
    """Branch weights are built from α on every call (inside the kernels on CUDA): a change of α by any
    route inside a scope — a numpy view, .data, an in-place op — reaches the next call."""
    layer = PetalLinear(8, 5, rank=2)
    randomise_adapters(layer)
    x, alpha = torch.randn(3, 4, 8), torch.rand(3)
    with torch.no_grad(), alpha_scope(alpha):
        layer(x)
        new = torch.rand(3)
        {"numpy": lambda: alpha.numpy().__setitem__(slice(None), new.numpy()),
         "data": lambda: alpha.data.copy_(new), "inplace": lambda: alpha.copy_(new)}[route]()
        torch.testing.assert_close(layer(x), ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A,
                                                              layer.lora_B, new, 1.0))


def test_injected_layers_get_the_same_streams_in_every_build():
    """Streams are numbered per model in module order: a model built twice (another run, a resumed one)
    draws the same dropout masks; the layers of one model have different streams."""
    def build():
        model = nn.Sequential(TinyBlock(), TinyBlock())
        inject_petal(model, "qkv", rank=2, dropout=0.5)
        inject_petal(model, "mlp", rank=2, branches=1, dropout=0.5)
        return model
    a, b = build(), build()
    streams = [m.stream for m in a.modules() if isinstance(m, PetalLinear)]
    assert streams == [m.stream for m in b.modules() if isinstance(m, PetalLinear)]
    assert sorted(streams) == list(range(1, 5))
