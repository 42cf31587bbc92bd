"""The CUDA and NCCL paths of ``run``, ``distributed``, SyncBN and ``benchmarks/gpu.sh``, on a CPU:
monkeypatched device counts, ``torch.device("cuda", i)`` objects, torch's functions spied on.
What only a GPU can show is listed in docs/gpu.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scratchdet import distributed as dist
from scratchdet import run
from scratchdet.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """A machine with N visible GPUs, as torch.cuda reports it (default 2)."""
    def set_count(n: int = 2) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    set_count()
    return set_count


def _torchrun(monkeypatch, local_rank: int, nproc: int) -> None:
    """The environment torchrun gives a worker (before the process group exists)."""
    for k, v in {"LOCAL_RANK": local_rank, "RANK": local_rank, "LOCAL_WORLD_SIZE": nproc, "WORLD_SIZE": nproc}.items():
        monkeypatch.setenv(k, str(v))


# --------------------------------------------------------------------------- 1. the device under torchrun


def test_cuda_under_torchrun_is_the_local_ranks_gpu(monkeypatch, gpus):
    _torchrun(monkeypatch, local_rank=1, nproc=2)
    assert not dist.is_initialized()  # decided before dist.init, which needs the index for set_device
    assert run.pick_device("cuda") == torch.device("cuda", 1)
    assert run.pick_device("auto") == torch.device("cuda", 1)
    assert run.pick_device("cpu") == torch.device("cpu")


def test_explicit_index_under_torchrun_is_refused(monkeypatch, gpus):
    _torchrun(monkeypatch, local_rank=0, nproc=2)
    with pytest.raises(ConfigError, match="local rank"):
        run.pick_device("cuda:1")


def test_more_processes_than_gpus_is_refused(monkeypatch, gpus):
    gpus(2)
    _torchrun(monkeypatch, local_rank=0, nproc=3)  # rank 0 sees it first: every rank refuses alike
    with pytest.raises(ConfigError, match="3 processes on this machine but 2 visible GPU"):
        run.pick_device("auto")
    with pytest.raises(ConfigError, match="3 processes"):
        run.pick_device("cuda")


def test_single_process_keeps_the_named_device(monkeypatch, gpus):
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert run.pick_device("cuda:1") == torch.device("cuda", 1)
    gpus(0)
    assert run.pick_device("auto") == torch.device("cpu")


def test_run_stamp_joins_with_an_indexed_device(monkeypatch, gpus):
    from scratchdet import cli

    _torchrun(monkeypatch, local_rank=1, nproc=2)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    joined = []
    monkeypatch.setattr(dist, "init", lambda device, timeout_s: joined.append(device))
    monkeypatch.setattr(dist, "broadcast", lambda obj: obj)
    cli._run_stamp(load_config(None, ["train.device=cuda"]))
    assert joined == [torch.device("cuda", 1)]


# --------------------------------------------------------------------------- 2. GPU RNG state per rank


def _solver():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture
def cuda_rng(monkeypatch, gpus):
    """One visible GPU whose RNG state is recorded when set; the model counts as on cuda:0."""
    gpus(1)
    restored = []

    def set_state(state, device="cuda"):
        index = torch.device(device).index or 0 if not isinstance(device, int) else device
        if index >= torch.cuda.device_count():
            raise IndexError(f"no GPU {index}")
        restored.append((int(state[0]), index))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    monkeypatch.setattr(run, "_model_device", lambda model: torch.device("cuda", 0), raising=False)
    return restored


def test_resume_on_fewer_gpus_than_saved_from(tmp_path, cuda_rng):
    from scratchdet import checkpoint as ckpt

    model, opt, sched, scaler = _solver()
    # A checkpoint of the old format: one state per GPU visible when it was written (8 of them).
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "rng": {**ckpt.rng_state(),
                                                    "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}}
    run.restore_training_state(state, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert cuda_rng == [(0, 0)]  # this process's GPU, cuda:0, gets GPU 0's state; no IndexError


def test_each_rank_restores_its_own_gpu_state(tmp_path, monkeypatch, cuda_rng):
    from scratchdet import checkpoint as ckpt

    model, opt, sched, scaler = _solver()
    per_rank = [torch.full((4,), 10 + r, dtype=torch.uint8) for r in range(2)]
    run.save_training_state(tmp_path / "m.pth", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                            iteration=3, progress={}, meta={}, config={}, device_rng=per_rank)
    state = ckpt.load_checkpoint(tmp_path / "m.pth")  # weights_only: a list of tensors loads
    assert "cuda" not in state["rng"]
    monkeypatch.setattr(dist, "rank", lambda: 1)
    run.restore_training_state(state, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert cuda_rng == [(11, 0)]  # rank 1's stream, on rank 1's device (cuda:0 of its own machine)
    monkeypatch.setattr(dist, "rank", lambda: 2)  # a rank the saving run did not have: left as seeded
    run.restore_training_state(state, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert cuda_rng == [(11, 0)]


# --------------------------------------------------------------------------- 3. SyncBN, empty batch, bf16


def test_syncbn_feeds_torchs_kernel_fp32_on_an_empty_batch(monkeypatch):
    from scratchdet import model as model_mod

    seen = []

    def torch_forward(self, x):  # stands in for torch.nn.SyncBatchNorm.forward (CUDA kernels)
        seen.append(x.dtype)
        return x
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", torch_forward)
    monkeypatch.setattr(model_mod.dist, "world_size", lambda: 2)
    bn = model_mod.SyncBatchNorm(4).train()
    # "meta" is not "cpu": the path torch's SyncBatchNorm takes on CUDA, without a GPU.
    out = bn(torch.empty(0, 4, 14, 14, dtype=torch.bfloat16, device="meta"))
    assert seen == [torch.float32] and out.dtype == torch.bfloat16 and out.shape == (0, 4, 14, 14)
    bn(torch.empty(2, 4, 14, 14, dtype=torch.bfloat16, device="meta"))
    assert seen[-1] == torch.bfloat16  # a batch with data keeps its dtype (batch_norm_stats returns fp32)


# ATen's CUDA kernels of torch's SyncBN forward, in Python, for the CPU (Normalization.cuh:
# batch_norm_reduce_statistics_kernel is batch_norm_gather_stats_with_counts, loop and all).
def _bn_stats(x, eps):
    return x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3), unbiased=False) + eps)


def _bn_gather(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
    avg, var_n, n = torch.zeros(x.shape[1]), torch.zeros(x.shape[1]), torch.zeros(())
    for m, invstd, c in zip(mean_all, invstd_all, counts):
        factor = 1.0 / (n + c)
        var_n = var_n + (1.0 / invstd**2 - eps) * c + (avg - m) ** 2 * n * c * factor
        avg = n * factor * avg + c * factor * m
        n = n + c
    running_mean.mul_(1 - momentum).add_(momentum * avg)  # with no counts: mean 0 ...
    running_var.mul_(1 - momentum).add_(momentum * var_n / (n - 1))  # ... and variance 0 / (0 - 1)
    return avg, torch.rsqrt(var_n / n + eps)


def _bn_elemt(x, weight, bias, mean, invstd, eps):
    return (x - mean.view(1, -1, 1, 1)) * (invstd * weight).view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _torch_syncbn_worker(rank, world, init_file, sizes, out):
    from scratchdet.model import SyncBatchNorm

    from .test_distributed import _join

    _join(rank, world, init_file)
    # torch's own nn.SyncBatchNorm.forward and autograd function run (the all-gather, here over gloo;
    # the empty ranks' counts filtered out; what it saves for backward): only the kernels are the
    # Python above, and the CPU passes torch's device check as a backend of its own would.
    torch._C._get_privateuse1_backend_name = lambda: "cpu"
    torch.batch_norm_stats, torch.batch_norm_gather_stats_with_counts = _bn_stats, _bn_gather
    torch.batch_norm_elemt = _bn_elemt
    bn = SyncBatchNorm(4).train()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    x = torch.randn(7, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    y = bn._torch_forward(x[:sizes[rank]])  # forward's CUDA branch, on CPU tensors
    torch.save({"y": y.detach(), "mean": bn.running_mean, "var": bn.running_var,
                "tracked": bn.num_batches_tracked}, f"{out}/{rank}.pt")
    dist.shutdown()


@pytest.mark.parametrize("sizes", [(0, 0), (3, 0)], ids=["all-empty", "one-rank-empty"])
def test_torchs_syncbn_path_leaves_running_stats_alone_when_every_rank_is_empty(tmp_path, sizes):
    from .test_distributed import _spawn

    _spawn(_torch_syncbn_worker, tmp_path, list(sizes), str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.running_mean.fill_(0.5)
        ref.running_var.fill_(2.0)
    if sum(sizes):  # BatchNorm over the one batch there is; torch's kernels as written above give it too
        ref(torch.randn(7, 4, 3, 3, generator=torch.Generator().manual_seed(0))[:sum(sizes)] * 3 + 1)
    for rank, p in enumerate(parts):
        assert p["y"].shape == (sizes[rank], 4, 3, 3)
        torch.testing.assert_close(p["mean"], ref.running_mean)
        torch.testing.assert_close(p["var"], ref.running_var)
        assert int(p["tracked"]) == int(ref.num_batches_tracked) == (1 if sum(sizes) else 0)


# --------------------------------------------------------------------------- 4. channels-last: auto


def test_channels_last_auto_is_on_for_the_cpu_only():
    assert TrainConfig().channels_last == "auto"
    assert run.use_channels_last("auto", torch.device("cpu"))
    assert not run.use_channels_last("auto", torch.device("cuda", 0))
    assert run.use_channels_last("on", torch.device("cuda", 0)) and not run.use_channels_last("off", torch.device("cpu"))
    assert load_config(None, ["train.channels_last=true"]).train.channels_last == "on"  # YAML booleans still work
    assert load_config(None, ["train.channels_last=false"]).train.channels_last == "off"
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=sometimes"])


# --------------------------------------------------------------------------- 5. precision on CUDA


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_amp_auto_on_cuda_is_bf16_with_tf32(monkeypatch, tf32_flags, caplog):
    assert TrainConfig().amp == "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with caplog.at_level("INFO", logger="scratchdet"):
        assert run.amp_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert "bf16 autocast; fp32 matmuls and convolutions in TF32" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100: fp32
    assert run.amp_dtype("auto", torch.device("cuda", 0)) is None


def test_amp_off_on_cuda_is_full_fp32(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert run.amp_dtype("off", torch.device("cuda", 0)) is None
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


# --------------------------------------------------------------------------- 6. deterministic=on


def test_deterministic_on_is_strict_and_sets_cublas(monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        run.seed_everything(0, True, strict=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_train_asks_for_strict_determinism_with_on(monkeypatch, tmp_path):
    from scratchdet import engine

    asked = {}

    class Stop(Exception):
        pass

    def seed(seed, deterministic, **kw):
        asked.update(deterministic=deterministic, **kw)
        raise Stop
    monkeypatch.setattr(engine, "seed_everything", seed)
    with pytest.raises(Stop):
        engine.train(load_config(None, ["train.deterministic=on", "train.device=cpu"]), tmp_path / "r", dry_run=True)
    assert asked == {"deterministic": True, "strict": True}


# --------------------------------------------------------------------------- 7. NCCL timeouts


def test_nccl_group_is_created_with_async_error_handling(monkeypatch):
    import torch.distributed as td

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    seen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(td, "init_process_group", lambda backend, **kw: seen.update(
        backend=backend, handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), device=kw.get("device_id")))
    monkeypatch.setattr(td, "new_group", lambda **kw: None)
    monkeypatch.setattr(td, "get_backend", lambda *a: "nccl")
    try:
        dist.init(torch.device("cuda", 0), timeout_s=5)
    finally:
        dist._CPU_GROUP = dist._MONITOR_GROUP = None
    assert seen == {"backend": "nccl", "handling": "1", "device": torch.device("cuda", 0)}


# --------------------------------------------------------------------------- 8. pauses wait for the GPU


def test_sync_device_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    run.sync_device(torch.device("cpu"))
    run.sync_device(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_training_pauses_wait_for_the_device(monkeypatch, tmp_path):
    from scratchdet import engine

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

    synced = []
    monkeypatch.setattr(engine, "sync_device", lambda device: synced.append(device), raising=False)
    engine.train(load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
        "solver.max_iter=4", "solver.checkpoint_period=2", "test.eval_period=3"]), tmp_path / "r", progress=False)
    # A checkpoint after iteration 2 and an evaluation after 3: each pause synchronizes at its start and end
    # (and none of the other iterations does: no per-step host sync).
    assert synced == [torch.device("cpu")] * 4


# --------------------------------------------------------------------------- 9. gpu.sh without a GPU


@pytest.mark.parametrize("visible", [None, ""])
def test_gpu_sh_without_a_gpu_says_so_in_one_line(tmp_path, visible):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OUT=str(tmp_path),
               TMPDIR=str(tmp_path))
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    elif torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stdout + p.stderr
    assert lines[0].startswith("gpu.sh: no CUDA GPU visible (torch ") and "torchvision" in lines[0]
