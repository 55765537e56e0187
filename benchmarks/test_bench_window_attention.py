"""Window attention benchmarks: every attention shape of GC ViT tiny / base at 224 and large at 384.

Run with ``pytest benchmarks/ --benchmark-only`` on a CUDA machine (skipped with a reason otherwise).
Implementations, each on the same inputs (the qkv map layout, fp16):

* ``fused``: gcvit_kernels.window_attention.window_attention (the custom op, Triton kernels);
* ``reference``: gcvit.functional.window_attention (partition, gather bias, matmul / softmax / matmul, reverse);
* ``sdpa``: partition + F.scaled_dot_product_attention with the gathered bias as an expanded float mask;
* ``flex``: partition + compiled FlexAttention with the learned table read in a score_mod.

Modes: ``fwd`` and ``fwd_bwd``. ``benchmark.extra_info`` carries achieved TFLOP/s and GB/s (model FLOPs and
the minimal bytes the fused op must move) and the ratio to the reference measured in the same test with
``triton.testing.do_bench``.
"""
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from gcvit import functional as ref

# (dim, heads per stage, windows per stage, resolution) -- channels double per stage, maps are res/4 / 2^i
VARIANTS = {
    "tiny224": (64, (2, 4, 8, 16), (7, 7, 14, 7), 224),
    "base224": (128, (4, 8, 16, 32), (7, 7, 14, 7), 224),
    "large384": (192, (6, 12, 24, 48), (12, 12, 24, 12), 384),
}
BATCH = {"tiny224": 64, "base224": 32, "large384": 16}


def attention_cases() -> List[dict]:
    cases, seen = [], set()
    for variant, (dim, heads, windows, resolution) in VARIANTS.items():
        for stage, (num_heads, window) in enumerate(zip(heads, windows)):
            fmap = resolution // 4 // 2 ** stage
            channels = dim * 2 ** stage
            for is_global in (False, True):
                case = dict(variant=variant, stage=stage, batch=BATCH[variant], fmap=fmap, window=window,
                            channels=channels, num_heads=num_heads, is_global=is_global)
                key = tuple(v for k, v in case.items() if k not in ("variant", "stage"))
                if key not in seen:
                    seen.add(key)
                    cases.append(case)
    return cases


def case_id(case: dict) -> str:
    kind = "global" if case["is_global"] else "local"
    return (f"{case['variant']}-s{case['stage']}-{kind}-B{case['batch']}-{case['fmap']}x{case['fmap']}"
            f"-win{case['window']}-C{case['channels']}-h{case['num_heads']}")


def make_inputs(case: dict, device, dtype) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    b, s, w, c, h = case["batch"], case["fmap"], case["window"], case["channels"], case["num_heads"]
    slots = 2 if case["is_global"] else 3
    qkv = torch.randn(b, s, s, slots * c, device=device, dtype=dtype)
    table = 0.02 * torch.randn((2 * w - 1) ** 2, h, device=device, dtype=dtype)
    global_query = torch.randn(b, w * w, c, device=device, dtype=dtype) if case["is_global"] else None
    return qkv, table, global_query


def _partitioned(qkv, global_query, num_heads, window):
    """(q, k, v) as (T, heads, N, head_dim) for the unfused baselines."""
    t_windows = ref.window_partition(qkv, (window, window))
    t, n, sc = t_windows.shape
    slots = 2 if global_query is not None else 3
    head_dim = sc // slots // num_heads
    parts = t_windows.reshape(t, n, slots, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if global_query is None:
        return parts[0], parts[1], parts[2]
    g = global_query.shape[0]
    q = global_query.reshape(g, n, num_heads, head_dim).permute(0, 2, 1, 3).repeat_interleave(t // g, 0)
    return q, parts[0], parts[1]


def _reverse(out, qkv, window):
    t, h, n, d = out.shape
    return ref.window_reverse(out.transpose(1, 2).reshape(t, n, h * d), (window, window), qkv.shape[1:3])


def implementation(name: str, case: dict) -> Callable:
    """fn(qkv, table, global_query) -> (B, H, W, C) for one implementation."""
    window, num_heads = case["window"], case["num_heads"]
    if name == "fused":
        from gcvit_kernels import window_attention as wa

        if torch.cuda.is_available():
            return lambda qkv, table, gq: wa.window_attention(qkv, table, num_heads, window, gq)
        return lambda qkv, table, gq: wa.window_attention_triton(qkv, table, num_heads, window, gq)
    if name == "reference":
        return lambda qkv, table, gq: ref.window_attention(qkv, table, num_heads, (window, window), gq)
    index = ref.relative_position_index((window, window))
    if name == "sdpa":
        def sdpa(qkv, table, gq):
            q, k, v = _partitioned(qkv, gq, num_heads, window)
            bias = ref.relative_position_bias(table, index.to(qkv.device)).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
            return _reverse(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), qkv, window)
        return sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def flex_fn(qkv, table, gq):
            q, k, v = _partitioned(qkv, gq, num_heads, window)
            flat_index = index.to(qkv.device)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[flat_index[q_idx, kv_idx], h]

            return _reverse(flex(q, k, v, score_mod=score_mod), qkv, window)
        return flex_fn
    raise ValueError(name)


def workload(case: dict, dtype, mode: str) -> Dict[str, float]:
    """Model FLOPs (2 matmuls forward, 5 backward) and the minimal bytes of the fused op."""
    b, s, w, c = case["batch"], case["fmap"], case["window"], case["channels"]
    tokens = b * s * s
    n = w * w
    elt = torch.finfo(dtype).bits // 8
    fwd_flops = 4 * tokens * n * c
    slots = 2 if case["is_global"] else 3
    fwd_bytes = tokens * (slots + 1) * c * elt + tokens * case["num_heads"] * 4
    if mode == "fwd":
        return dict(flops=fwd_flops, bytes=fwd_bytes)
    # backward reads qkv, out, dO, lse and writes dqkv: about twice the forward's traffic
    return dict(flops=fwd_flops * 7 / 2, bytes=fwd_bytes + tokens * (2 * slots + 2) * c * elt)


def make_step(fn: Callable, inputs, mode: str) -> Callable:
    qkv, table, gq = inputs
    if mode == "fwd":
        return lambda: fn(qkv, table, gq)
    leaves = [t.detach().requires_grad_() for t in (qkv, table) + ((gq,) if gq is not None else ())]
    grad_out = None

    def step():
        nonlocal grad_out
        out = fn(*leaves[:2], leaves[2] if len(leaves) > 2 else None)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        torch.autograd.grad(out, leaves, grad_out)
    return step


IMPLEMENTATIONS = ("fused", "reference", "sdpa", "flex")
CASES = attention_cases()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="window attention benchmarks need a CUDA GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_window_attention(benchmark, case, impl, mode):
    import triton.testing

    dtype = torch.float16
    inputs = make_inputs(case, "cuda", dtype)
    step = make_step(implementation(impl, case), inputs, mode)
    reference_step = make_step(implementation("reference", case), inputs, mode)
    step()  # compile / autotune outside the timing
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    impl_ms = triton.testing.do_bench(step)
    reference_ms = triton.testing.do_bench(reference_step)
    work = workload(case, dtype, mode)
    benchmark.extra_info.update(
        case=case_id(case), impl=impl, mode=mode, dtype=str(dtype), do_bench_ms=impl_ms,
        reference_do_bench_ms=reference_ms, speedup_vs_reference=reference_ms / impl_ms,
        tflops=work["flops"] / impl_ms / 1e9, gbps=work["bytes"] / impl_ms / 1e6,
    )
