"""The one place that decides device, dtype and distributed backend.

Everything else in nabla asks this module; no other file names "cuda", "mps"
or "nccl". Order of preference: CUDA, then Apple MPS, then CPU.
"""

from __future__ import annotations

import importlib.util
import os
import platform

import torch

from nabla.errors import ConfigError

# Compute dtype per device type when the caller says nothing. CPUs without
# native bf16 arithmetic run bf16 matrix products dozens of times slower than
# fp32, so a CPU computes in fp32 (bf16 checkpoints are upcast at load).
DEFAULT_DTYPE = {
    "cuda": torch.bfloat16,  # fp16 where the card has no bf16, see default_dtype()
    "mps": torch.float16,
    "cpu": torch.float32,
}

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def choose_device(name: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the one named, else $NABLA_DEVICE, else CUDA, MPS, CPU in that order.

    Under torchrun each process takes the GPU of its LOCAL_RANK; more processes
    on a machine than it has GPUs is refused (NCCL runs one process per GPU).
    """
    if name is None:
        name = os.environ.get("NABLA_DEVICE") or None
    if name is not None:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but this torch has no CUDA GPU; use device='cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} was asked for but MPS is not available here; use device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = _rank_gpu()
        return device
    if torch.cuda.is_available():
        return _rank_gpu()
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _rank_gpu() -> torch.device:
    n, rank = torch.cuda.device_count(), local_rank()
    if rank >= n:
        raise ConfigError(
            f"this is process {rank} (LOCAL_RANK) on a machine with {n} CUDA GPU(s): NCCL runs one process "
            f"per GPU, so start at most {n} per machine (torchrun --nproc_per_node {n}), or set "
            "NABLA_DEVICE=cpu to run every process on the CPU (gloo)")
    return torch.device("cuda", rank)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16 (or auto)") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype nabla uses on `device` when none is asked for."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return DEFAULT_DTYPE.get(device.type, torch.float32)


def auto_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The checkpoint's own dtype where `device` computes in it well, else the nearest one.

    bf16 stays bf16 on CPUs and on GPUs that have it (fp16 on older GPUs and
    on MPS); fp16 stays fp16 on GPUs and MPS (CPUs compute it in fp32); fp32
    stays fp32.
    """
    if checkpoint_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return default_dtype(device)
    if checkpoint_dtype == torch.float32:
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if checkpoint_dtype == torch.bfloat16 else torch.float32
    if device.type == "cuda":
        return torch.float16 if not torch.cuda.is_bf16_supported() else checkpoint_dtype
    if device.type == "mps":
        return torch.float16
    return default_dtype(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for a request: a name, "auto" (the checkpoint's), or None (the device's)."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return auto_dtype(device, checkpoint_dtype)
    return parse_dtype(dtype) or default_dtype(device)


def complex_ok(device: torch.device) -> bool:
    """Whether `device` has complex-number kernels (the rotary embedding uses one
    complex multiply where it can; older macOS MPS builds lack them)."""
    return device.type != "mps"


def records_graphs(device: torch.device) -> bool:
    """Whether `device` can record a sequence of kernels once and replay it (CUDA graphs)."""
    return device.type == "cuda"


def record_graph(fn, device: torch.device, pool=None):
    """Run `fn` twice to warm up, then record one call of it as a CUDA graph.

    Returns (replay, output, pool): `replay()` reruns the recorded kernels,
    which rewrite `output` in place; graphs recorded with the same `pool`
    share their scratch memory (they must not run concurrently).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out, graph.pool()


def dist_backend(device: torch.device) -> str:
    """NCCL only where the processes compute on CUDA; gloo everywhere else."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe(device: torch.device) -> str:
    """The device in words, for reports: the GPU's name, or the CPU's model and cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def free_memory(device: torch.device) -> int:
    """Bytes `device` can still give: the GPU's free memory, else the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def peak_device_memory(device: torch.device) -> int | None:
    """Most bytes torch has held on an accelerator so far (None on the CPU: see peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def use_all_cores() -> None:
    """Let torch use every core this process may run on (torch may default to fewer)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    if torch.get_num_threads() < n and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(n)


def bf16_weights_only(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 on `device` means bf16 *weights* with fp32 products (activations, cache, logits fp32).

    So on CPUs without native bf16 arithmetic (no AVX512-BF16/AMX): there torch's
    bf16 matrix products run at under 1 GFLOP/s against ~85 in fp32 (measured,
    BENCHMARKS.md), while bf16 weights still halve the bytes a decode step reads.
    """
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return True


def row_kernels(device: torch.device) -> bool:
    """Whether decode-sized products on `device` run nabla's numba kernels (nabla.model.cpu_kernels).

    Measured on a 2-core AVX2 CPU (BENCHMARKS.md): torch's fp32
    F.linear read one-row weights at 4-10 GB/s, the numba kernels at 17-21,
    the memory's limit. Only where numba is installed.
    """
    return device.type == "cpu" and importlib.util.find_spec("numba") is not None


def quantized_kernel(device: torch.device, mode: str) -> str:
    """The kernel that computes int8 / int4 products fastest on `device` (see nabla.model.quantize).

    Measured on an AVX2 CPU without native bf16 (BENCHMARKS.md):
    FBGEMM's dynamic int8 linear beat fp32 F.linear (2x at batch 1, >10x at
    batch 8) while torch's weight-only int8/int4 kernels ran 20-40x slower than
    fp32; so x86 CPUs take FBGEMM for int8. For int4 torch's int4pack kernel
    beat rebuilding the weight per call (4x at batch 1) but stayed slower than
    fp32 there. nabla's own numba kernels read the int8 / int4 bytes at the
    memory's speed and win where numba is installed: int4 (Q4_0) in integer dot
    products (AVX-512 VNNI or AVX2), int8 weight-only, or on VNNI CPUs in integer
    dot products with x per block of 32 as llama.cpp does (prefill too); prefill
    otherwise takes FBGEMM (int8) or a rebuilt weight (int4).
    Weights stay small; products run in fp32 or in the integer kernel, never in
    bf16 arithmetic the CPU lacks.
    """
    if device.type != "cpu":
        return "dequant"
    if row_kernels(device):
        return "numba"
    if mode == "int8":
        if "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic"):
            return "fbgemm"
        return "dequant"
    return "int4pack" if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "dequant"


# ---- what training and data loading ask about a device (so they never name one)

def is_accelerator(device: torch.device) -> bool:
    """A GPU-like device: pinned host memory, async copies, fused optimizers, its own RNG."""
    return device.type == "cuda"


def bind(device: torch.device) -> None:
    """Make `device` this process's current device (one GPU per torchrun process)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def ddp_device_ids(device: torch.device) -> list[int] | None:
    return [device.index] if device.type == "cuda" else None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for training: bf16 autocast where the device computes bf16 natively, else none."""
    if device.type == "cuda" and default_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return None


def rng_state(device: torch.device) -> torch.Tensor | None:
    """The device's own random state (None where it shares the CPU's)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
