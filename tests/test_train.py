"""The training script: exact resume, DDP equivalence, crash safety, non-finite skips, errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from petal_fast.training import state as training_state
from petal_fast.config import DataConfig, TrainConfig, load_config
from petal_fast.models import trainable_state_dict
from petal_fast.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    data = DataConfig(num_identities=6, images_per_identity=4, degrade=True, resolution=(8, 16))
    base = dict(mode="petalface", backbone="tiny", batch_size=8, epochs=2, lr=1e-3, dropout=0.2, seed=3,
                output=str(tmp_path / "run"), progress=False, calibrate_batches=1, data=data, save_every=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainable_state_dict(trainer.model)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_exact_resume(tmp_path):
    """N steps == N/2 steps, a fresh process-like restart, N/2 more (adapters, optimizer, schedule)."""
    full = Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "full")))
    full.fit()
    assert full.step == 6
    first = Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "split")))
    first.fit(stop_after=4)  # crosses the epoch boundary at 3
    assert first.step == 4
    torch.manual_seed(12345)  # a restarted process has other RNG state: resume must restore it
    second = Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "split")))
    second.fit()
    assert second.step == 6
    assert_same_state(full, second)
    assert (tmp_path / "full" / "model.pt").exists() and (tmp_path / "full" / "log.jsonl").exists()
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped"] == 0
    assert 0 < summary["warmup_seconds"] < summary["seconds"] and summary["warmup_images"] == 8


def test_throughput_excludes_the_first_step():
    """The first step (compilation with compile = true) is reported apart, not averaged into img/s."""
    from petal_fast.training.result import TrainResult
    run = TrainResult(steps=5, images=40, seconds=10.0, warmup_seconds=8.0, warmup_images=8)
    assert run.images_per_second == 16.0
    assert "first step 8.0 s" in run.summary() and "16.0 img/s" in run.summary()
    assert TrainResult(steps=1, images=8, seconds=4.0, warmup_seconds=4.0, warmup_images=8).images_per_second == 2.0
    assert TrainResult().images_per_second == 0.0


def test_non_finite_loss_skips_step(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, dropout=0.0))
    head = trainer.model.head
    original = head.forward
    head.forward = lambda e, y, **kw: original(e, y, **kw) * float("nan")
    images = torch.rand(8, 3, 40, 40) * 2 - 1
    labels = torch.arange(8) % 6
    before = {k: v.clone() for k, v in weights(trainer).items()}
    loss, applied = trainer.train_step(images, labels)
    assert not applied and trainer.skipped == 1 and trainer.step == 1
    for k, v in weights(trainer).items():
        assert torch.equal(v, before[k]), k
    head.forward = original
    _, applied = trainer.train_step(images, labels)
    assert applied and any(not torch.equal(v, before[k]) for k, v in weights(trainer).items())


def test_label_out_of_range_is_an_error_before_any_update(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path))
    before = {k: v.clone() for k, v in weights(trainer).items()}
    with pytest.raises(ValueError, match="label out of range"):
        trainer.train_step(torch.rand(8, 3, 40, 40), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert trainer.step == 0
    for k, v in weights(trainer).items():
        assert torch.equal(v, before[k])
    from petal_fast.models import build_model
    small_head = build_model("lora", backbone="tiny", num_classes=3)
    with pytest.raises(ValueError, match="margin head has 3 classes"):
        Trainer(tiny_cfg(tmp_path, mode="lora"), model=small_head)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    from petal_fast.training import state as training_state
    from tests.test_train import tiny_cfg
    from petal_fast.train import Trainer
    from pathlib import Path
    calls = {{"n": 0}}
    real_save = torch.save
    def dying_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:       # third checkpoint: write half of it, then die without cleanup
            f.write(b"\\x00" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **kw)
    training_state.torch.save = dying_save
    Trainer(tiny_cfg(Path({tmp!r}))).fit()
""")


def test_killed_during_checkpoint_write_resumes_from_last_complete(tmp_path):
    script = KILL_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = training_state.load(tmp_path / "run" / training_state.LAST)  # the previous, complete checkpoint
    assert state["step"] == 2
    resumed = Trainer(tiny_cfg(tmp_path))
    result = resumed.fit()
    assert resumed.step == 6 and result.steps == 6
    assert training_state.load(tmp_path / "run" / training_state.LAST)["step"] == 6


# Registered before the Trainer, so it runs after the Trainer's own exit handler (atexit is LIFO):
# it records whether the process group the Trainer created was torn down before the interpreter, and
# how many threads the process still has (Gloo's workers must be joined by then).
EXIT_PROBE = textwrap.dedent("""
    import atexit, os, torch.distributed as dist
    def _probe(path=os.path.join({out!r}, "exit-rank" + os.environ["RANK"])):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = "alive" if dist.is_initialized() else "destroyed"
        open(path, "w").write(state + " " + str(len(os.listdir("/proc/self/task"))))
    atexit.register(_probe)
""")


def assert_group_destroyed_at_exit(out: Path) -> None:
    """A rank that exits with its Gloo group or its worker threads alive can abort (SIGABRT, "terminate
    called without an active exception") during interpreter teardown: the group is destroyed and its
    threads joined first, although DDP holds the group (destroy_process_group alone left 4-5 threads)."""
    for rank in range(2):
        assert (out / f"exit-rank{rank}").read_text() == "destroyed 1", f"rank {rank}"


DDP_SCRIPT = EXIT_PROBE + textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.test_train import tiny_cfg
    from petal_fast.train import Trainer
    from petal_fast.models import trainable_state_dict
    t = Trainer(tiny_cfg(Path({tmp!r}), mode="lora", dropout=0.0, batch_size={batch}, output={out!r},
                         compile={compile}))
    t.fit()
    if t.rank == 0:
        torch.save(trainable_state_dict(t.model), {out!r} + "/weights.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_two_process_gloo_equals_single_process(tmp_path, compile):
    """DDP over 2 gloo ranks trains to the weights of one eager process with the global batch; compiled,
    DDP wraps the fullgraph-compiled model (Dynamo cannot trace DDP's own forward in one graph)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        script = DDP_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), batch=4, out=str(tmp_path / "ddp"),
                                   compile=compile)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_group_destroyed_at_exit(tmp_path / "ddp")
    single = Trainer(tiny_cfg(tmp_path, mode="lora", dropout=0.0, batch_size=8, output=str(tmp_path / "one")))
    single.fit()
    ddp = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    ref = weights(single)
    assert ddp.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


SHARDED_SCRIPT = EXIT_PROBE + textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.test_train import first_step_grads, tiny_cfg
    from petal_fast.train import Trainer
    out = {out!r}
    t = Trainer(tiny_cfg(Path({tmp!r}), mode="lora", dropout=0.0, batch_size=4, sharded_head=True, output=out,
                         compile={compile}))
    head0 = t.full_head_weight()
    grads = first_step_grads(t, lambda images, labels: t.model.head(t.ddp(images), labels))
    shard_grad = t.model.head.weight.grad.detach()
    t.model.head.weight.grad = None
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(t.world)]
    dist.all_gather(sizes, torch.tensor([shard_grad.shape[0]]))
    parts = [torch.zeros(int(n), shard_grad.shape[1]) for n in sizes]
    dist.all_gather(parts, shard_grad.contiguous())
    grads["head.weight"] = torch.cat(parts)
    t.optimizer.zero_grad(set_to_none=True)
    t.fit()                                   # trains end to end, adapters stay in sync across ranks
    adapters = torch.cat([p.detach().flatten() for n, p in t.model.named_parameters()
                          if p.requires_grad and not n.startswith("head.")])
    other = [torch.empty_like(adapters) for _ in range(t.world)]
    dist.all_gather(other, adapters)
    assert torch.equal(other[0], other[1]), "ranks diverged"
    if t.rank == 0:
        os.makedirs(out, exist_ok=True)
        torch.save({{"head0": head0, "grads": grads}}, out + "/grads.pt")
""")


def first_step_grads(trainer: Trainer, loss_fn) -> dict[str, torch.Tensor]:
    """Gradients of every trainable tensor for the first batch of epoch 0 (no optimizer step)."""
    from petal_fast.train import prepare_images
    images, labels = next(iter(trainer.loader(0)))
    loss_fn(prepare_images(images, trainer.image_size, trainer.device), labels).backward()
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
            if p.requires_grad and p.grad is not None and not n.startswith("head.")}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_sharded_head_two_process_equals_single_process(tmp_path, compile):
    """Class-sharded head over 2 gloo ranks: the same gradients as one eager process holding every class
    with the same global batch (adapters and every class centre), and the ranks stay in sync; compiled,
    the embedding is one graph and the head's collectives run eagerly."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        script = SHARDED_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), out=str(tmp_path / "sharded"),
                                       compile=compile)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_group_destroyed_at_exit(tmp_path / "sharded")
    saved = torch.load(tmp_path / "sharded" / "grads.pt", weights_only=True)
    single = Trainer(tiny_cfg(tmp_path, mode="lora", dropout=0.0, batch_size=8, output=str(tmp_path / "one")))
    with torch.no_grad():
        single.model.head.weight.copy_(saved["head0"])
    ref = first_step_grads(single, lambda images, labels: single.model(images, labels))
    ref["head.weight"] = single.model.head.weight.grad
    got = saved["grads"]
    assert ref.keys() == got.keys() and any("lora_B" in k for k in ref)
    # compiled: Inductor's fused float32 reductions reorder sums (seen: 3.6e-6 on a 1e-2 head gradient)
    tol = dict(rtol=1e-3, atol=1e-5) if compile else dict(rtol=1e-4, atol=1e-6)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{k}: {m}")


def test_config_files_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('mode = "lora"\nbatch_size = 4\n[data]\nnum_identities = 7\nresolution = [10, 20]\n')
    cfg = load_config(path, ["lr=1e-3", "data.images_per_identity=3", "targets=['attn.qkv','attn.proj']"])
    assert cfg.mode == "lora" and cfg.batch_size == 4 and cfg.lr == 1e-3
    assert cfg.data.num_identities == 7 and cfg.data.images_per_identity == 3 and cfg.data.resolution == (10, 20)
    assert cfg.targets == ("attn.qkv", "attn.proj")
    assert cfg.margin_args() == ("cosface", None)
    assert load_config(None, ["loss=arcface", "margin=0.5"]).margin_args() == ("combined", (1.0, 0.5, 0.0))
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="mode must be"):
        load_config(None, ["mode=distill"])
    with pytest.raises(ValueError, match="pretrained"):
        load_config(None, ["mode=full_ft"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_cli_train_and_eval_round_trip(tmp_path):
    """`petal-fast train` on synthetic data, then the trained run reloads for inference."""
    from petal_fast.cli import main
    out = tmp_path / "cli"
    assert main(["train", "mode=lora", "backbone=tiny", "batch_size=8", "epochs=1", "data.num_identities=4",
                 "data.images_per_identity=4", f"output={out}", "progress=false"]) == 0
    from petal_fast.train import load_trained
    model = load_trained(out)
    with torch.no_grad():
        emb = model.embed(torch.rand(2, 3, 40, 40) * 2 - 1)
    assert emb.shape == (2, model.embedding_size) and torch.isfinite(emb).all()
    assert main(["eval", "--checkpoint", str(out), "--data", "synthetic:ids=5,per_id=3,size=40,offset=500",
                 "--num-pairs", "20", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert any(k.endswith("/identification") for k in report) and any(k.endswith("/verification") for k in report)


def test_compile_config_matches_eager(tmp_path, monkeypatch):
    """``compile = true`` trains through torch.compile(fullgraph=True) with the same losses and weights as
    eager. The graph is compiled with AOTAutograd and eager kernels here (the same capture, fake tensors
    and compiled backward as Inductor, without its C++ code generation, which takes minutes on 2 cores)."""
    real_compile = torch.compile
    calls = []

    def compile_aot(model, **kw):
        calls.append(kw)
        return real_compile(model, **{**kw, "backend": "aot_eager"})
    monkeypatch.setattr(torch, "compile", compile_aot)
    eager = Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "eager"), max_steps=3, epochs=1))
    eager_result = eager.fit()
    compiled = Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "compiled"), max_steps=3, epochs=1, compile=True))
    compiled_result = compiled.fit()
    assert calls == [{"fullgraph": True}]
    assert compiled_result.losses == pytest.approx(eager_result.losses, rel=1e-5)
    for k, v in weights(eager).items():
        torch.testing.assert_close(weights(compiled)[k], v, rtol=1e-4, atol=1e-6)


def test_cuda_graphs_setting_compiles_with_reduce_overhead(tmp_path, monkeypatch):
    """cuda_graphs = true compiles the model + loss with mode="reduce-overhead" (CUDA-graph replay); on a
    CPU run it is refused up front, in the config and in the Trainer."""
    from petal_fast.config import ConfigError
    from petal_fast.training.distributed import Distributed
    with pytest.raises(ConfigError, match="cuda_graphs"):
        tiny_cfg(tmp_path, cuda_graphs=True, device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs=true needs a CUDA device"):
        Trainer(tiny_cfg(tmp_path, cuda_graphs=True))  # device=auto resolves to the CPU here
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda net, **kw: (seen.update(kw), net)[1])
    Distributed(torch.device("cpu")).wrap(torch.nn.Linear(2, 2), tiny_cfg(tmp_path, cuda_graphs=True))
    assert seen == {"fullgraph": True, "mode": "reduce-overhead"}


@pytest.mark.gpu
def test_cuda_graphs_training_matches_eager(tmp_path):
    """Replayed CUDA graphs train like eager (dropout off: Inductor's RNG draws other masks)."""
    runs = {}
    for name, kw in (("eager", {}), ("graphs", {"cuda_graphs": True})):
        cfg = tiny_cfg(tmp_path / name, device="cuda", epochs=1, save_every=0, dropout=0.0, **kw)
        runs[name] = Trainer(cfg).fit()
    eager, graphs = runs["eager"], runs["graphs"]
    assert graphs.steps == eager.steps and graphs.skipped == 0
    for a, b in zip(eager.losses, graphs.losses):
        assert abs(a - b) <= 2e-2 * abs(a), (eager.losses, graphs.losses)
