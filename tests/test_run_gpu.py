"""The CUDA and NCCL paths of ``device``, ``run``, ``distributed``, SyncBN and ``benchmarks/gpu.sh``, on a CPU:
monkeypatched device counts, ``torch.device("cuda", i)`` objects, torch's functions spied on.
What only a GPU can show is listed in docs/gpu.md."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from scratchdet import device, run
from scratchdet import distributed as dist
from scratchdet.config import ConfigError, ModelConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """A machine with N visible GPUs, as torch.cuda reports it (default 2)."""
    def set_count(n: int = 2) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    set_count()
    set_count.current = []  # what torch.cuda.set_device was given
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: set_count.current.append(torch.device(device)))
    return set_count


def _torchrun(monkeypatch, local_rank: int, nproc: int) -> None:
    """The environment torchrun gives a worker (before the process group exists)."""
    for k, v in {"LOCAL_RANK": local_rank, "RANK": local_rank, "LOCAL_WORLD_SIZE": nproc, "WORLD_SIZE": nproc}.items():
        monkeypatch.setenv(k, str(v))


# --------------------------------------------------------------------------- 1. the device under torchrun


def test_cuda_under_torchrun_is_the_local_ranks_gpu(monkeypatch, gpus):
    _torchrun(monkeypatch, local_rank=1, nproc=2)
    assert not dist.is_initialized()  # decided before dist.init, which needs the index for set_device
    assert device.pick_device("cuda") == torch.device("cuda", 1)
    assert device.pick_device("auto") == torch.device("cuda", 1)
    assert device.pick_device("cpu") == torch.device("cpu")


def test_explicit_index_under_torchrun_is_refused(monkeypatch, gpus):
    _torchrun(monkeypatch, local_rank=0, nproc=2)
    with pytest.raises(ConfigError, match="local rank"):
        device.pick_device("cuda:1")


def test_more_processes_than_gpus_is_refused(monkeypatch, gpus):
    gpus(2)
    _torchrun(monkeypatch, local_rank=0, nproc=3)  # rank 0 sees it first: every rank refuses alike
    with pytest.raises(ConfigError, match="3 processes on this machine but 2 visible GPU"):
        device.pick_device("auto")
    with pytest.raises(ConfigError, match="3 processes"):
        device.pick_device("cuda")


def test_single_process_keeps_the_named_device(monkeypatch, gpus):
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert device.pick_device("cuda:1") == torch.device("cuda", 1)
    gpus(0)
    assert device.pick_device("auto") == torch.device("cpu")


def test_one_process_on_cuda_n_makes_gpu_n_current(monkeypatch, gpus):
    # Without set_device, the pin-memory thread, the allocator's first context and is_bf16_supported()
    # would use GPU 0 while the model trains on GPU 1.
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert device.pick_device("cuda:1") == torch.device("cuda", 1)
    assert gpus.current == [torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match=r"train.device=cuda:2: only 2 GPU\(s\) visible"):
        device.pick_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch, gpus, name):
    # Once: "CUDA precision: ..." logged, then torch's "Found no NVIDIA driver" traceback from model.to(device).
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    gpus(0)
    with pytest.raises(ConfigError, match=f"train.device={name}: torch sees no CUDA GPU") as e:
        device.pick_device(name)
    assert "\n" not in str(e.value) and "train.device=cpu" in str(e.value)


def test_train_on_cuda_without_a_gpu_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    from scratchdet.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--out", str(tmp_path / "run"), "train.device=cuda", "data.synth.num_train=2",
                 "data.synth.num_val=1"]) != 0
    err = capsys.readouterr().err
    assert "train.device=cuda: torch sees no CUDA GPU" in err and "Traceback" not in err and "NVIDIA driver" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


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
    from scratchdet import norm as norm_mod

    seen = []

    def torch_forward(self, x):  # stands in for torch.nn.SyncBatchNorm.forward (CUDA kernels)
        seen.append(x.dtype)
        return x
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", torch_forward)
    monkeypatch.setattr(norm_mod.dist, "world_size", lambda: 2)
    bn = norm_mod.SyncBatchNorm(4).train()
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
    from scratchdet.norm import SyncBatchNorm

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
    assert device.use_channels_last("auto", torch.device("cpu"))
    assert not device.use_channels_last("auto", torch.device("cuda", 0))
    assert device.use_channels_last("on", torch.device("cuda", 0)) and not device.use_channels_last("off", torch.device("cpu"))
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


@pytest.fixture
def cuda_device(monkeypatch):
    """A visible CUDA device of a given compute capability, as torch.cuda reports it; torch's own
    emulation probe (a bf16 tensor on the device) succeeds, as it does on a V100 or T4."""
    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}"))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
        monkeypatch.setattr(torch.version, "hip", None)
    return set_capability


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)], ids=["V100", "A100", "H100"])
def test_amp_auto_on_cuda_is_bf16_only_where_native(cuda_device, tf32_flags, caplog, major, native):
    # torch.cuda.is_bf16_supported() is true on a V100 (it counts emulation): auto must not pick bf16 there.
    assert TrainConfig().amp == "auto"
    cuda_device(major)
    with caplog.at_level("INFO", logger="scratchdet"):
        assert device.amp_dtype("auto", torch.device("cuda", 0)) == (torch.bfloat16 if native else None)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert ("bf16 autocast; fp32 matmuls and convolutions in TF32" in caplog.text) == native
    assert f"compute capability {major}.0" in device.precision_reason("auto", torch.device("cuda", 0))


def test_forced_bf16_on_a_gpu_that_emulates_it_runs_with_a_warning(cuda_device, tf32_flags, caplog):
    cuda_device(7)
    with caplog.at_level("WARNING", logger="scratchdet"):
        assert device.amp_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    assert "only emulates bf16" in caplog.text and "compute capability 7.0" in caplog.text
    caplog.clear()
    cuda_device(8)
    with caplog.at_level("WARNING", logger="scratchdet"):
        assert device.amp_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    assert "emulates" not in caplog.text


# A Xeon of Skylake-SP to Ice Lake: AVX-512 without AVX512-BF16 or AMX; oneDNN calls bf16 "supported" there.
AVX512_ONLY = {"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize("caps, native", [
    (AVX512_ONLY, False),
    ({**AVX512_ONLY, "avx512_bf16": True}, True),            # Cooper Lake, Zen 4
    ({**AVX512_ONLY, "amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids
    ({"architecture": "x86_64", "avx2": True}, False),
    ({"architecture": "aarch64", "neon": True, "bf16": True}, True),  # Graviton 3
    ({"architecture": "aarch64", "neon": True, "bf16": False}, False),
], ids=["avx512-only", "avx512-bf16", "amx", "avx2", "arm-bf16", "arm"])
def test_amp_auto_on_the_cpu_asks_the_cpus_flags_not_onednn(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    # What the old check asked: true on any AVX-512 CPU, where bf16 is emulated (3-4x slower than fp32).
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert device.amp_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert device.cpu_bf16_support()[0] == native
    assert ("bf16 would be emulated" in device.precision_reason("auto", torch.device("cpu"))) == (not native)


def test_forced_bf16_on_a_cpu_that_emulates_it_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX512_ONLY)
    with caplog.at_level("WARNING", logger="scratchdet"):
        assert device.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "only emulates bf16" in caplog.text and "slower than fp32" in caplog.text
    assert device.amp_dtype("off", torch.device("cpu")) is None


def test_cpu_flags_from_proc_cpuinfo_where_torch_has_no_capabilities(monkeypatch, tmp_path):
    # torch before get_capabilities: the kernel's flags line decides.
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    real = device.Path

    def fake_path(p, *a):
        return real(tmp_path / "cpuinfo") if str(p) == "/proc/cpuinfo" else real(p, *a)

    monkeypatch.setattr(device, "Path", fake_path)
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw\n")
    assert device.cpu_bf16_support()[0] is False
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert device.cpu_bf16_support() == (True, "avx512_bf16")


def test_dry_run_prints_the_precision_the_cpu_computes(monkeypatch, tmp_path):
    # As a user sees it: `scratchdet train --dry-run` on a CPU without native bf16 prints fp32 and why.
    code = ("import sys, torch; torch.cpu.get_capabilities = lambda: {'architecture': 'x86_64', 'avx512_f': True}; "
            "from scratchdet.cli import main; sys.exit(main(['train', '--dry-run', '--out', sys.argv[1], "
            "'data.synth.num_train=4', 'data.synth.num_val=2']))")
    env = {**os.environ, "SCRATCHDET_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "precision: fp32" in out.stdout + out.stderr and "bf16 would be emulated" in out.stdout + out.stderr


def test_amp_off_on_cuda_is_full_fp32(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert device.amp_dtype("off", torch.device("cuda", 0)) is None
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


# --------------------------------------------------------------------------- 6. deterministic=on


def test_deterministic_on_is_strict_and_sets_cublas(monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        device.seed_everything(0, True, strict=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_train_asks_for_strict_determinism_with_on(monkeypatch, tmp_path):
    from scratchdet import engine, loop

    asked = {}

    class Stop(Exception):
        pass

    def seed(seed, deterministic, **kw):
        asked.update(deterministic=deterministic, **kw)
        raise Stop
    monkeypatch.setattr(loop, "seed_everything", seed)  # where the run's set-up seeds
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


@pytest.mark.parametrize("nccl, gloo, expect", [
    ("eth0", None, "eth0"),          # an exact name
    ("eth", None, "eth1"),           # NCCL's prefix: the first match with an address (eth0 has none here)
    ("eth0,ib", None, "ib0"),        # a list: eth0 has no address, so the next match
    ("=eth", None, None),            # NCCL's exact form naming no interface here
    ("^docker", None, None),         # an exclusion gloo cannot express: logged, not guessed
    ("eth0", "ib0", "ib0"),          # the user's own GLOO_SOCKET_IFNAME wins
    (None, None, None),
])
def test_gloo_binds_to_the_interface_nccl_was_given(monkeypatch, caplog, nccl, gloo, expect):
    # On stock Ubuntu the host name resolves to 127.0.1.1: gloo groups bound there cannot reach other nodes.
    import socket

    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth0"), (3, "eth1"), (4, "ib0")])
    # gloo aborts on an interface without an address ("Unable to find address for: ifb0"): eth0 has none,
    # except in the first case, which names it alone.
    monkeypatch.setattr(dist, "_has_address", lambda name: name != "eth0" or nccl == "eth0")
    for k, v in (("NCCL_SOCKET_IFNAME", nccl), ("GLOO_SOCKET_IFNAME", gloo)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    with caplog.at_level("INFO", logger="scratchdet"):
        assert dist.gloo_interface_from_nccl() == expect
    assert os.environ.get("GLOO_SOCKET_IFNAME") == (expect or gloo)
    if nccl and not gloo and expect is None:
        assert "set GLOO_SOCKET_IFNAME too" in caplog.text


def test_process_group_init_sets_gloo_interface_first(monkeypatch):
    import torch.distributed as td

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    seen = {}
    monkeypatch.setattr(td, "init_process_group", lambda backend, **kw: seen.update(
        backend=backend, gloo=os.environ.get("GLOO_SOCKET_IFNAME")))
    monkeypatch.setattr(td, "new_group", lambda **kw: None)
    monkeypatch.setattr(td, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(td, "group", types.SimpleNamespace(WORLD=None))
    try:
        dist.init(torch.device("cpu"), timeout_s=5)
    finally:
        dist._CPU_GROUP = dist._MONITOR_GROUP = None
    assert seen == {"backend": "gloo", "gloo": "lo"}


# --------------------------------------------------------------------------- 9. mask targets and sampling


def test_mask_targets_never_take_torchvisions_pure_pytorch_roi_align(monkeypatch):
    # Deterministic mode on CUDA sends torchvision.ops.roi_align to _roi_align, forward included; for mask
    # targets (full-size ground-truth masks, adaptive sampling) its intermediate is [K, 1, 28, 28, H, W].
    # Here that path is forced on the CPU (as if the compiled ops were missing) and spied on.
    import sys as _sys

    from torchvision.models.detection import roi_heads

    from scratchdet.model import build_model

    build_model(ModelConfig(depth=18, stem_channels=16, base_width=16, gn_groups=4, fpn_channels=32,
                            box_head_conv_dim=32, box_head_fc_dim=64, mask_head_conv_dim=32), num_classes=2)
    ra = _sys.modules["torchvision.ops.roi_align"]
    expanded = []

    def spy(input, rois, *a, **k):
        expanded.append(tuple(input.shape))
        raise MemoryError("pure-PyTorch RoIAlign on full-size masks")

    gt = (torch.rand(3, 60, 80) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[2.0, 3.0, 40.0, 50.0], [10.0, 0.0, 79.0, 59.0], [0.0, 0.0, 20.0, 20.0]])
    matched = torch.tensor([0, 1, 2])
    reference = torch.ops.torchvision.roi_align(gt[:, None].float(), torch.cat([matched[:, None].float(), boxes], 1),
                                                1.0, 28, 28, -1, False)[:, 0]
    monkeypatch.setattr(ra, "_roi_align", spy)
    monkeypatch.setattr(ra, "_has_ops", lambda: False)
    targets = roi_heads.project_masks_on_boxes(gt, boxes, matched, 28)
    assert expanded == []
    assert torch.equal(targets, reference)  # the compiled kernel's forward: what the CPU always ran


def test_anchor_and_roi_samples_are_drawn_on_the_anchors_device(monkeypatch):
    # On a GPU the permutation must not be drawn on the CPU and copied each step; here the device
    # the draws are made on is recorded (CPU tensors: the draws and the samples are the CPU's as before).
    from scratchdet.layers import SeededSampler, sampling_seeds

    real = torch.randperm
    devices = []

    def spy(n, *a, generator=None, device=None, **k):
        devices.append((torch.device(device) if device is not None else None, generator.device))
        return real(n, *a, generator=generator, device=device, **k)

    matched = [torch.tensor([1, 0, 0, -1, 2, 0, 0, 0]), torch.tensor([0, 0, 1, 0])]
    sampler = SeededSampler(4, 0.5, salt=1)
    with sampling_seeds([3, 4]):
        before = sampler(matched)
    monkeypatch.setattr(torch, "randperm", spy)
    with sampling_seeds([3, 4]):
        after = sampler(matched)
    assert devices and all(d == (torch.device("cpu"), torch.device("cpu")) for d in devices)
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    g = torch.Generator().manual_seed((3 * 1_000_003 + 1) % 2**63)  # the CPU stream it always drew from
    positive = torch.where(matched[0] >= 1)[0]
    assert torch.equal(torch.where(after[0][0] == 1)[0].sort().values,
                       positive[real(positive.numel(), generator=g)[:2]].sort().values)


# --------------------------------------------------------------------------- 10. pauses wait for the GPU


def test_sync_device_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    device.sync_device(torch.device("cpu"))
    device.sync_device(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_training_pauses_wait_for_the_device(monkeypatch, tmp_path):
    from scratchdet import engine, loop

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

    synced = []
    monkeypatch.setattr(loop, "sync_device", lambda device: synced.append(device))  # the throughput timer's pauses
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


def test_gpu_sh_fits_one_device_call_and_measures_what_auto_runs():
    # One device call runs 600 s at most and a session has 15 minutes of device time: the steps' limits
    # must leave a rerun's room (540 s), and the grid must measure train.amp=auto (bf16 with TF32), not an
    # explicit bf16 that leaves TF32 off.
    import re

    text = (ROOT / "benchmarks" / "gpu.sh").read_text()
    total, loops = 0, [1]  # the product of the enclosing for-loops' lengths
    for line in text.splitlines():
        m = re.match(r"\s*for \w+ in ([^;]+); do", line)
        if m:
            loops.append(loops[-1] * len(m.group(1).split()))
        elif re.match(r"\s*done\b", line):
            loops.pop()
        step = re.search(r"\bstep (\d+) ", line)
        if step and not line.lstrip().startswith("#"):
            total += int(step.group(1)) * loops[-1]
    assert 0 < total <= 540, total
    assert "--precisions auto,off" in text and "train.amp=bf16" not in text
