"""Atomic directory writes (a saved directory appears complete or not at all) and exact tensor bytes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes, for hashing: any dtype (numpy has no bf16), any device, any layout."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` in one rename.

    On error the temporary directory is removed and an existing ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
