"""Distributed training on the CPU with gloo, 2 processes: SyncBN, DDP, sharded evaluation, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from scratchdet import distributed as dist
from scratchdet.norm import SyncBatchNorm
from scratchdet.run import read_metrics

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


def _spawn(fn, tmp_path, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, init_file, *args)`` in ``world`` gloo processes."""
    mp.spawn(fn, args=(world, str(tmp_path / "init"), *args), nprocs=world, join=True)


def _join(rank: int, world: int, init_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist._CPU_GROUP = torch.distributed.group.WORLD
    torch.set_num_threads(1)


def _global_batch(sizes, offset=2.0):
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x = torch.randn(n, 4, 5, 3, generator=g) * 3 + offset
    w = torch.randn(n, 4, 5, 3, generator=g)  # a fixed random linear loss on the outputs
    return x, w


def _syncbn_worker(rank, world, init_file, sizes, out, offset):
    _join(rank, world, init_file)
    x, w = _global_batch(sizes, offset)
    lo = sum(sizes[:rank])
    xr = x[lo:lo + sizes[rank]].clone().requires_grad_(True)
    bn = SyncBatchNorm(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    y = bn(xr)
    (y * w[lo:lo + sizes[rank]]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": xr.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                "mean": bn.running_mean, "var": bn.running_var}, f"{out}/{rank}.pt")
    dist.shutdown()  # barrier, then close: see _ddp_empty_worker


@pytest.mark.parametrize("sizes, offset", [((4, 2), 2.0), ((6, 0), 2.0), ((0, 0), 2.0), ((3, 3), 300.0)],
                         ids=["uneven", "one-rank-empty", "all-empty", "large-mean"])
def test_syncbn_equals_batchnorm_over_the_concatenated_batch(tmp_path, sizes, offset):
    # large-mean: activations of mean 300 and std 3; a one-pass E[x^2] - E[x]^2 in fp32 loses the
    # variance to cancellation there (errors of 1e-2 and more), two passes do not.
    _spawn(_syncbn_worker, tmp_path, list(sizes), str(tmp_path), offset)
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    x, w = _global_batch(sizes, offset)
    x.requires_grad_(True)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    if sum(sizes):
        y = bn(x)
        (y * w).sum().backward()
    else:  # BatchNorm refuses an empty batch; SyncBN over empty batches everywhere returns them as they are
        y, x.grad = x.detach(), torch.zeros_like(x)
        bn.weight.grad = bn.bias.grad = torch.zeros(4)
    # fp32 holds an input of 300 to about 3e-5: the outputs agree to the inputs' own precision
    # (a one-pass variance is off by 5e-2 at that mean).
    tol = {"atol": 1e-5, "rtol": 1e-5} if offset < 10 else {"atol": 1e-4, "rtol": 1e-3}
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad, **tol)
    # Parameter gradients are per rank; DDP sums (averages) them over ranks.
    for key, ref in (("w_grad", bn.weight.grad), ("b_grad", bn.bias.grad)):
        got = sum(p[key] if p[key] is not None else torch.zeros(4) for p in parts)
        torch.testing.assert_close(got, ref, **tol)
    for p in parts:  # every rank holds the same running statistics, those of the whole batch
        torch.testing.assert_close(p["mean"], bn.running_mean, **tol)
        torch.testing.assert_close(p["var"], bn.running_var, **tol)


def _ddp_empty_worker(rank, world, init_file):
    _join(rank, world, init_file)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNorm(4))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    for step in range(3):  # empty batches everywhere, then a real one: DDP must see every parameter used
        n = 0 if step < 2 else 2
        ddp(torch.randn(n, 3, 4, 4)).sum().backward()
    # A group left to the interpreter's exit, or closed while a peer still talks, can abort in
    # gloo's threads after the work is done (1 run in 8 here): leave together, as the CLI does.
    del ddp
    dist.shutdown()


def test_syncbn_with_empty_batches_everywhere_under_ddp(tmp_path):
    _spawn(_ddp_empty_worker, tmp_path)


def test_syncbn_in_one_process_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    sync, ref = SyncBatchNorm(4), nn.BatchNorm2d(4)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)


# --------------------------------------------------------------------------- whole runs under torchrun

ROOT = Path(__file__).resolve().parents[1]
# 1 image per process; roi_batch_size_per_image=4 (one positive RoI per image) and 64 RPN anchors per
# image give every image the same number of sampled anchors, RoIs and mask RoIs, so torchvision's
# losses (normalized by the batch's sample counts) weight images alike in 1 process x 2 images and in
# 2 processes x 1 image: the two runs differ only in floating-point summation order.
DDP_ARGS = TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
    "model.roi_batch_size_per_image=4", "model.score_thresh_test=0.0", "solver.base_lr=0.02",
    "solver.max_iter=30", "solver.steps=[20]", "solver.checkpoint_period=4", "solver.keep_checkpoints=0",
    "train.log_period=3", "test.eval_period=10", "train.dist_timeout=120"]
TIMING = ("images_per_sec", "time_per_iter")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(*args, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "scratchdet", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _single(*args):
    return subprocess.Popen([sys.executable, "-m", "scratchdet", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _weights(run):
    return torch.load(run / "model_final.pth", weights_only=True)["model"]


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """An uninterrupted 2-process run of DDP_ARGS (through `scratchdet train --num-gpus 2`)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    code, out = _finish(_single("train", *DDP_ARGS, "--num-gpus", "2", "--out", str(run), "--no-progress"))
    assert code == 0, out
    return run


def test_two_processes_train_like_one_process_with_the_global_batch(tmp_path):
    """2 processes x 1 image reach the weights of 1 process x 2 images, to 5% of the update.

    Both see the same images with the same augmentation, draw the same anchors and RoIs (each
    image's sample comes from its own seed) and compute the same losses (checked to 1e-4).  What
    differs is floating-point summation order: DDP's all-reduce of gradients versus one backward
    pass over the batch.  In fp32 that is not last-bit noise everywhere: GroupNorm's backward
    subtracts near-equal sums, and for the box head of a fresh network the result is a few
    percent off in single tensors (in fp64 the two agree to 1e-15).  After 3 iterations the whole
    model's update differs by about 1.3% between the two; later, top-k and NMS over near-equal
    scores of a fresh network pick different proposals and the runs part ways, as any two runs
    on different hardware would.  A missing or doubled gradient average, a wrong shard or a
    per-rank learning rate each change the update by 50% or more.
    """
    from scratchdet.config import load_config
    from scratchdet.model import build_model

    torch.manual_seed(0)
    init = build_model(load_config(None, DDP_ARGS).model, num_classes=6).state_dict()
    torch.save(init, tmp_path / "init.pth")  # a known starting point (a detector state dict for model.init)
    args = [*DDP_ARGS, "solver.max_iter=3", "train.log_period=1", "test.eval_period=0",
            f"model.init={tmp_path / 'init.pth'}"]
    two, one = tmp_path / "two", tmp_path / "one"
    code, out = _finish(_torchrun("train", *args, "--out", str(two), "--no-progress"))
    assert code == 0, out
    code, out = _finish(_single("train", *args, "--out", str(one), "--no-progress"))
    assert code == 0, out
    a, b = _weights(two), _weights(one)
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    update = torch.cat([(b[k] - init[k]).flatten() for k in keys]).norm()
    assert update > 0.05 and diff <= 0.05 * update, (diff.item(), update.item())
    # The logged losses and counters describe the global batch in both.
    la = [r for r in read_metrics(two) if "loss" in r]
    lb = [r for r in read_metrics(one) if "loss" in r]
    assert [r["images_seen"] for r in la] == [r["images_seen"] for r in lb] == [2, 4, 6]
    assert [r["instances_seen"] for r in la] == [r["instances_seen"] for r in lb]
    for key in ("loss", "loss_classifier", "loss_mask", "loss_objectness"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], rel=1e-4), key
    assert json.loads((two / "env.json").read_text())["world_size"] == 2


def test_distributed_evaluation_gives_the_single_process_numbers(ddp_reference, tmp_path):
    code, out = _finish(_single("eval", "--run", str(ddp_reference), "train.device=cpu"))
    assert code == 0, out
    single = json.loads((ddp_reference / "inference/metrics.json").read_text())
    single_results = json.loads((ddp_reference / "inference/coco_instances_results.json").read_text())
    # (--run-dir: torchrun's own parser would take --run for its --run-path)
    code, out = _finish(_torchrun("eval", "--run-dir", str(ddp_reference), "train.device=cpu"))
    assert code == 0, out
    assert "x 2 processes" in out
    multi = json.loads((ddp_reference / "inference/metrics.json").read_text())
    assert len([k for k in single if "/" in k]) == 24 and single == multi
    assert single_results and json.loads((ddp_reference / "inference/coco_instances_results.json").read_text()) == \
        single_results


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)


def test_two_process_run_killed_and_resumed_is_bitwise_identical(ddp_reference, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun("train", *DDP_ARGS, "--out", str(run), "--no-progress")
    _wait_for(run / "model_0000008.pth.sha256", proc)
    for pid in [proc.pid, *_worker_pids(proc.pid).values()]:  # the agent and both workers: a machine going down
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert not (run / "model_final.pth").exists()
    code, out = _finish(_torchrun("train", *DDP_ARGS, "--resume", str(run), "--no-progress"))
    assert code == 0, out
    m = re.search(r"resumed from model_(\d{7})\.pth at iteration (\d+)", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 8, out
    a, b = _weights(ddp_reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == _metrics(ddp_reference)


def _worker_pids(agent_pid):
    """torchrun's worker processes (children of its agent), by rank."""
    pids = {}
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0][5:])] = int(child)
    return pids


def test_sigterm_to_one_rank_checkpoints_once_and_stops_all(ddp_reference, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun("train", *DDP_ARGS, "--out", str(run), "--no-progress")
    _wait_for(run / "model_0000004.pth.sha256", proc)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
    code, out = _finish(proc)
    assert code != 0
    written = re.findall(r"checkpoint written at iteration (\d+)", out)
    assert written, out
    n = int(written[0])
    assert set(written) == {str(n)}  # every rank stopped after the same iteration
    assert sorted(p.name for p in run.glob("model_*.pth")) == sorted(
        {f"model_{i:07d}.pth" for i in range(4, 30, 4) if i <= n} | {f"model_{n:07d}.pth"})
    code, out = _finish(_torchrun("train", *DDP_ARGS, "--resume", str(run), "--no-progress"))
    assert code == 0, out
    assert f"resumed from model_{n:07d}.pth at iteration {n}" in out
    a, b = _weights(ddp_reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_max_restarts_resumes_by_itself(ddp_reference, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun("train", *DDP_ARGS, "--out", str(run), "--no-progress", extra=["--max-restarts=1"])
    _wait_for(run / "model_0000008.pth.sha256", proc)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)  # one worker dies; torchrun restarts the group
    code, out = _finish(proc)
    assert code == 0, out
    assert "resuming" in out and re.search(r"resumed from model_\d{7}\.pth at iteration \d+", out), out
    a, b = _weights(ddp_reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == _metrics(ddp_reference)


def test_global_batch_must_divide_among_processes(tmp_path):
    code, out = _finish(_torchrun("train", *DDP_ARGS, "solver.ims_per_batch=3", "--out", str(tmp_path / "r"),
                                  "--no-progress"))
    assert code != 0 and "solver.ims_per_batch=3 is the global batch and must divide among the 2 processes" in out


def test_torchrun_default_preset_with_syncbn_on_this_cpu(tmp_path):
    # The command as a user types it (the default preset: 4 images, 2 per process).
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "scratchdet",
                           "train", "model.norm=SyncBN", "solver.max_iter=10", "--no-progress"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # one run directory, written by rank 0 alone
    run = runs[0]
    records = read_metrics(run)
    assert [r["iteration"] for r in records if "loss" in r] == [10]
    assert [r["iteration"] for r in records if "segm/AP" in r] == [10]
    assert (run / "model_final.pth").is_file() and (run / "coco_instances_results.json").is_file()
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert "SyncBatchNorm" in json.loads((run / "final.json").read_text())["norm_layers"]


def test_bn_statistics_evaluated_as_saved_under_ddp(tmp_path):
    # With plain BN each rank keeps its own running statistics (DDP syncs them only at the start of a
    # training forward); the run's own evaluation must use the saved (rank 0's) ones on every shard,
    # or its numbers differ from `scratchdet eval --run` of the same checkpoint.
    run = tmp_path / "run"
    args = [*DDP_ARGS, "model.norm=BN", "solver.max_iter=12", "test.eval_period=0", "solver.checkpoint_period=100"]
    code, out = _finish(_torchrun("train", *args, "--out", str(run), "--no-progress"))
    assert code == 0, out
    trained = json.loads((run / "coco_instances_results.json").read_text())
    code, out = _finish(_single("eval", "--run", str(run), "train.device=cpu"))
    assert code == 0, out
    assert trained and json.loads((run / "inference/coco_instances_results.json").read_text()) == trained
