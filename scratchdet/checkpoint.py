"""Checkpoints: atomic writes, sha256 sidecars, pruning, verified resume, RNG state.

Written as detectron2 names them (``model_0004999.pth``, ``model_final.pth``); each is a dict with
``model`` (state dict), ``optimizer``, ``scheduler``, ``iteration``, ``rng`` and ``meta``.
A checkpoint counts only when its ``.sha256`` sidecar matches: a write killed half way leaves
either nothing or a file whose sidecar is missing or wrong, and resume falls back to the one before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PERIODIC = re.compile(r"model_(\d{7})\.pth$")
FINAL = "model_final.pth"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> str:
    """Save atomically with a checksum sidecar; returns the sha256."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return digest


def verify(path: str | Path) -> str | None:
    """None when ``path`` matches its sidecar, else what is wrong."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return "missing"
    if not side.is_file():
        return "no .sha256 sidecar (the write did not finish)"
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        return f"checksum mismatch (file {actual[:12]}, sidecar {expected[:12]}): truncated or corrupted"
    return None


def load_checkpoint(path: str | Path, *, verify_checksum: bool = True) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code runs from a checkpoint file)."""
    path = Path(path)
    if verify_checksum and (problem := verify(path)) is not None:
        raise ValueError(f"{path}: {problem}")
    return torch.load(path, map_location="cpu", weights_only=True)


def periodic_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the periodic checkpoints in a run folder, oldest first."""
    found = []
    for p in Path(run_dir).glob("model_*.pth"):
        m = PERIODIC.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest periodic checkpoint that verifies and loads; warns about each one skipped."""
    for _, path in reversed(periodic_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: fall back to an older one
            log.warning("checkpoint %s is not usable (%s); falling back to the one before", path, e)
    return None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, path in periodic_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as tensors and plain types (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[
            int(v) if isinstance(v, (int, np.integer)) else float(v) for v in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
