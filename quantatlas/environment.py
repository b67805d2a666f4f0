"""What a run records about where it ran: packages, git commit, device, host."""
from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

PACKAGES = ("quantatlas", "torch", "transformers", "numpy", "safetensors", "gguf", "zstandard", "brotli")


def git_commit() -> str:
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def check_device(name: str, label: str = "--device") -> str:
    """`name` if torch can compute on that device here, else a UserError in one line (`label` names where
    it was given): not a device name, a device this build or machine lacks (cuda without a GPU, cuda:3 on
    a one-GPU machine), or meta, which holds no numbers."""
    import torch

    from quantatlas.errors import UserError

    field = label.removeprefix("field ")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{label}: {name!r} is not a torch device (cpu, cuda, cuda:1 ...)", field) from None
    if device.type == "meta":
        raise UserError(f"{label}: 'meta' holds no numbers to compute with", field)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{label}: {name!r} is not available here ({why})", field) from None
    return name


def device_name(device) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"cpu:{platform.machine()}:{torch.get_num_threads()}threads"


def environment(device) -> dict:
    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "packages": pkgs,
        "git_commit": git_commit(),
        "device": device_name(device),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv[:],
    }
