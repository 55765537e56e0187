"""Benchmarks of the Triton Fused-MBConv against the reference math, eager and torch.compile'd.

Every distinct Fused-MBConv block shape of GC ViT tiny (dim 64) and base (dim 128) at 224x224:
the stem block (C = dim at 112x112), the downsamplers at each stage input (dim at 56, 2 dim at 28,
4 dim at 14) and the global-query generators (stage 0: dim at 56, 28, 14; stage 1: 2 dim at 28, 14;
stage 2: 4 dim at 14; stage 3: 8 dim at 7). Forward and forward+backward, batch 64.

``benchmark.extra_info`` carries, measured in the same test: the fused, eager-reference and
compiled-reference times (median ms, CUDA-synchronised), the speedups, and the achieved bandwidth of
the fused op under the compulsory-traffic model -- forward reads x and writes y (2 tensors), the
backward reads grad_out and x and writes grad_x (3 more); weights are negligible -- with its fraction
of the GPU's peak memory bandwidth where the device is known.

CUDA only (skipped with a reason otherwise); ``tests/test_mbconv.py`` runs :func:`measure` at a tiny
shape on any device so this file is exercised in CI. Run: ``pytest benchmarks/test_bench_mbconv.py``.
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from gcvit import functional as ref
from gcvit_kernels import mbconv

BATCH = 64
VARIANT_DIMS = {"tiny": 64, "base": 128}

# Peak DRAM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10", 0.6e12),
)


def block_shapes(dim: int) -> List[Tuple[str, int, int]]:
    """Distinct (where, channels, size) of the Fused-MBConv blocks of a variant at 224x224."""
    shapes = [
        ("stem", dim, 112),
        ("down0", dim, 56), ("down1", 2 * dim, 28), ("down2", 4 * dim, 14),
        ("gq0", dim, 56), ("gq0", dim, 28), ("gq0", dim, 14),
        ("gq1", 2 * dim, 28), ("gq1", 2 * dim, 14),
        ("gq2", 4 * dim, 14),
        ("gq3", 8 * dim, 7),
    ]
    seen, distinct = set(), []
    for where, c, s in shapes:
        if (c, s) not in seen:
            seen.add((c, s))
            distinct.append((where, c, s))
    return distinct


CASES = [(variant, where, c, s) for variant, dim in VARIANT_DIMS.items() for where, c, s in block_shapes(dim)]


def peak_bandwidth(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def make_case(channels, size, batch, dtype, device):
    x = torch.randn(batch, channels, size, size, dtype=dtype, device=device)
    c_rd = channels // 4
    weights = [
        torch.randn(channels, 1, 3, 3, dtype=dtype, device=device) * 0.4,
        torch.randn(c_rd, channels, 1, 1, dtype=dtype, device=device) * channels ** -0.5,
        torch.randn(channels, c_rd, 1, 1, dtype=dtype, device=device) * c_rd ** -0.5,
        torch.randn(channels, channels, 1, 1, dtype=dtype, device=device) * channels ** -0.5,
    ]
    return x, weights


def make_step(fn: Callable, x, weights, mode: str) -> Callable[[], None]:
    """One forward ("fwd") or forward+backward ("fwd_bwd") of fn, inputs prepared outside the timing."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, *weights)
        return step
    leaves = [t.detach().requires_grad_() for t in [x, *weights]]
    grad_out = torch.randn_like(x)

    def step():
        fn(*leaves).backward(grad_out)
    return step


def time_ms(step: Callable[[], None], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of one step in ms, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compulsory_bytes(x: torch.Tensor, mode: str) -> int:
    tensors = 2 if mode == "fwd" else 5
    return tensors * x.numel() * x.element_size()


def fused_fn(device: torch.device) -> Callable:
    # the op (dispatcher + Triton) on CUDA; elsewhere the direct Triton path (interpreter)
    return mbconv.fused_mbconv if device.type == "cuda" else mbconv.fused_mbconv_triton


def measure(channels: int, size: int, batch: int, dtype: torch.dtype, device, mode: str,
            compile_backend: str = "inductor", reps: int = 20) -> Dict[str, float]:
    """Fused vs eager reference vs torch.compile'd reference, one shape, in one run."""
    device = torch.device(device)
    x, weights = make_case(channels, size, batch, dtype, device)
    compiled_ref = torch.compile(ref.fused_mbconv, backend=compile_backend)
    fused_ms = time_ms(make_step(fused_fn(device), x, weights, mode), device, reps)
    eager_ms = time_ms(make_step(ref.fused_mbconv, x, weights, mode), device, reps)
    compiled_ms = time_ms(make_step(compiled_ref, x, weights, mode), device, reps)
    gbps = compulsory_bytes(x, mode) / (fused_ms * 1e-3) / 1e9
    result = dict(fused_ms=fused_ms, eager_ms=eager_ms, compiled_ms=compiled_ms,
                  speedup_vs_eager=eager_ms / fused_ms, speedup_vs_compiled=compiled_ms / fused_ms, gbps=gbps)
    peak = peak_bandwidth(device)
    if peak is not None:
        result["fraction_of_peak_bandwidth"] = gbps * 1e9 / peak
    return result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU (this run has none)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant,where,channels,size", CASES, ids=[f"{v}-{w}-C{c}-{s}x{s}" for v, w, c, s in CASES])
def test_bench_fused_mbconv(benchmark, variant, where, channels, size, mode, dtype):
    device = torch.device("cuda")
    result = measure(channels, size, BATCH, dtype, device, mode)
    x, weights = make_case(channels, size, BATCH, dtype, device)
    step = make_step(mbconv.fused_mbconv, x, weights, mode)

    def synced_step():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(synced_step, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(result)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(device), variant=variant, block=where,
                                shape=[BATCH, channels, size, size], dtype=str(dtype), mode=mode)
