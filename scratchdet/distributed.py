"""Process-group helpers for torchrun/DDP: rank and world size, process-group setup with
timeouts, agreement on host flags, reductions, gathering results, and the differentiable
all-reduce behind SyncBN on the CPU.

A single process (no ``torchrun``) is world size 1 and every helper is a no-op there.  Host
flags (a SIGTERM, a stop) travel over a gloo group on the CPU, so agreeing on them every
iteration costs no GPU synchronization.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as td

log = logging.getLogger("scratchdet")

_CPU_GROUP: Any = None  # a gloo group for host-side flags and objects (the default group on CPU runs)
_MONITOR_GROUP: Any = None  # a gloo group used only to name stalled ranks (a timed-out group is closed)
# Set before NCCL's process group is created (``init``): a timeout ends the job with a report.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def restarted() -> bool:
    """This worker group is a restart by ``torchrun --max-restarts`` after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0


def _has_address(name: str) -> bool:
    """Whether network interface ``name`` has an IPv4 address (ioctl SIOCGIFADDR) or an IPv6 one (Linux)."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            return True
    except OSError:
        pass
    try:
        return any(line.split()[-1] == name for line in open("/proc/net/if_inet6"))
    except OSError:
        return False


def gloo_interface_from_nccl() -> str | None:
    """Give gloo the network interface NCCL was given, where only NCCL's is set.

    The gloo groups (stop flags every iteration, barriers, gathers) bind to the address the host name
    resolves to; on stock Ubuntu /etc/hosts maps it to 127.0.1.1, so ranks on other nodes cannot connect
    though NCCL (told NCCL_SOCKET_IFNAME) does.  A user's own GLOO_SOCKET_IFNAME wins.  NCCL reads each
    comma-separated name as a prefix (``eth`` is eth0, eth1, ...), gloo as an exact name: the prefixes are
    matched against this host's interfaces, and NCCL's ``^`` (exclude) / ``=`` (exact) forms are said in
    the log rather than guessed.  Like NCCL's bootstrap, the first matching interface that has an address is
    taken: gloo aborts on a named interface without one.  Returns what gloo will use, or None."""
    import socket

    nccl, gloo = os.environ.get("NCCL_SOCKET_IFNAME"), os.environ.get("GLOO_SOCKET_IFNAME")
    if gloo or not nccl:
        return gloo
    names = [name for _, name in socket.if_nameindex()]
    wanted = [p.strip() for p in nccl.removeprefix("=").split(",") if p.strip()]
    exact = nccl.startswith("=")
    chosen = next((n for n in names if any(n == p or (not exact and n.startswith(p)) for p in wanted)
                   and _has_address(n)), None)
    if nccl.startswith("^") or chosen is None:
        log.warning("NCCL_SOCKET_IFNAME=%s names no interface gloo can use here (interfaces: %s); set "
                    "GLOO_SOCKET_IFNAME too, or the host-side gloo groups may bind to 127.0.1.1 on another node",
                    nccl, ", ".join(names))
        return None
    os.environ["GLOO_SOCKET_IFNAME"] = chosen
    log.info("GLOO_SOCKET_IFNAME=%s (from NCCL_SOCKET_IFNAME=%s): the host-side gloo groups use NCCL's interface",
             chosen, nccl)
    return chosen


def init(device: torch.device, *, timeout_s: float) -> None:
    """Join the process group torchrun describes (NCCL for CUDA, gloo for CPU), with a collective
    timeout, and a gloo group for host flags; nothing without a launcher."""
    global _CPU_GROUP
    if not launched() or is_initialized():
        return
    gloo_interface_from_nccl()
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store (its agent's) across --max-restarts; the ranks of a restarted
        # group would read the addresses the failed group left there and fail to connect.  One
        # key prefix per attempt keeps the attempts apart.
        store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                            is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        kwargs.update(store=td.PrefixStore(f"scratchdet/attempt_{attempt}", store), rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
    global _MONITOR_GROUP
    if device.type == "cuda":
        # NCCL's watchdog, not our gloo monitor, sees a stalled collective first.  Async error
        # handling 1 aborts the communicator and ends the process with an error naming the
        # collective (op type, sequence number, size) and how long it ran; read when the NCCL
        # process group is created; a user's own setting wins (TORCH_NCCL_DESYNC_DEBUG=1 adds
        # which rank had not joined, docs/gpu.md).
        for name, value in NCCL_ENV.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(device)
        td.init_process_group("nccl", device_id=device, **kwargs)
        _CPU_GROUP = td.new_group(backend="gloo", timeout=timeout)
    else:
        td.init_process_group("gloo", **kwargs)
        _CPU_GROUP = td.group.WORLD
    _MONITOR_GROUP = td.new_group(backend="gloo", timeout=timeout)
    log.info("process group: rank %d of %d, backend %s, collective timeout %gs", rank(), world_size(),
             td.get_backend(), timeout_s)


def shutdown() -> None:
    global _CPU_GROUP, _MONITOR_GROUP
    if is_initialized():
        barrier()
        td.destroy_process_group()
    _CPU_GROUP = _MONITOR_GROUP = None


def _collective_failed(what: str, error: Exception) -> RuntimeError:
    """A collective that failed or timed out; after a timeout (the peers are alive but one stalls),
    gloo's monitored barrier names the ranks that do not answer.  A peer that died is reported as
    such at once: torchrun is tearing the group down, and a restart waits for this process."""
    stalled = ""
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        try:
            td.monitored_barrier(group=_MONITOR_GROUP or _CPU_GROUP, timeout=datetime.timedelta(seconds=10),
                                 wait_all_ranks=True)
        except Exception as e:  # noqa: BLE001 - its message is the report
            stalled = f"; {e}"
    return RuntimeError(f"rank {rank()}: {what} failed ({error.__class__.__name__}: {error}){stalled}")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a SIGTERM, a non-finite loss)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    try:
        td.all_reduce(t, op=td.ReduceOp.MAX, group=_CPU_GROUP)
    except Exception as e:  # noqa: BLE001 - a timeout or a dead peer
        raise _collective_failed("agreeing on the stop flags", e) from e
    return bool(t.item())


def sum_ints(values: list[int]) -> list[int]:
    """Element-wise sum over ranks of a few host integers (images, instances, pixels seen)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    td.all_reduce(t, group=_CPU_GROUP)
    return [int(v) for v in t.tolist()]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place reduction over ranks on ``t``'s device (asynchronous on CUDA: no host sync)."""
    if world_size() > 1:
        td.all_reduce(t, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op])
    return t


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size() if is_main() else []
    td.gather_object(obj, out if is_main() else None, dst=0, group=_CPU_GROUP)
    return out if is_main() else None


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0, group=_CPU_GROUP)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) on every rank: DDP syncs them only at the start of
    each training forward, so before evaluating, each rank's copy may differ from the one saved."""
    if world_size() > 1:
        for b in module.buffers():
            td.broadcast(b, src=0)


def barrier() -> None:
    if world_size() > 1:
        td.barrier(group=_CPU_GROUP)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is a sum over ranks as well: each rank's statistics feed
    every rank's output, so every rank's gradient flows back to each (detectron2's
    ``differentiable_all_reduce`` does the same)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        td.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


def differentiable_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if world_size() > 1 else x
