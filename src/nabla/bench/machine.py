"""What the machine can do: memory read bandwidth (the decode roofline), free memory, peak RSS.

Decoding one token at batch 1 reads every weight once, so its ceiling is
(memory read bandwidth) / (bytes of weights). `read_bandwidth` measures the
bandwidth with several probes; the best is the roofline.

Leaves out: compute peaks (FLOP/s; prefill is reported as a rate only) and
the device choice (nabla.device).
"""

from __future__ import annotations

import os
import resource
import time

import torch
import torch.nn.functional as F

from nabla import device as devices


def read_bandwidth(device: torch.device | None = None, nbytes: int | None = None,
                   repeats: int = 3) -> dict[str, float]:
    """Memory read bandwidth of `device` in GB/s by several probes over an `nbytes` buffer (best of `repeats`).

    256 MiB on a CPU, 2 GiB on an accelerator (well past any cache).
    """
    device = device or torch.device("cpu")
    on_cpu = device.type == "cpu"
    nbytes = nbytes or (256 if on_cpu else 2048) * 2**20
    n = nbytes // 4
    buf = torch.ones(n, device=device)
    K = 4096
    w = buf[: (n // K) * K].view(-1, K)
    x = torch.ones(1, K, device=device)
    probes = {
        "torch_sum": lambda: buf.sum(),
        "torch_linear_1xK": lambda: F.linear(x, w),
    }
    if on_cpu:
        arr = buf.numpy()
        probes["numpy_sum"] = lambda: arr.sum()
    out = {}
    for name, probe in probes.items():
        probe()
        best = min(_seconds(probe, device) for _ in range(repeats))
        out[name] = nbytes / best / 1e9
    return out


def _seconds(fn, device: torch.device) -> float:
    devices.synchronize(device)
    t0 = time.perf_counter()
    fn()
    devices.synchronize(device)
    return time.perf_counter() - t0


def available_memory(device: torch.device | None = None) -> int:
    """Bytes `device` (default: the CPU) can still give."""
    return devices.free_memory(device or torch.device("cpu"))


def peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r * 1024 if os.uname().sysname != "Darwin" else r
