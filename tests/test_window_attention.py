"""Triton window attention (gcvit_kernels.window_attention) against gcvit.functional.window_attention.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py), so shapes are small.
Tolerances: fp64 runs exactly in the interpreter (gradcheck; the saved lse is fp32 by contract, so gradients
carry ~1e-7 relative error, far inside gradcheck's atol 1e-5); fp32 forward atol 2e-5, gradients atol 1e-4
relative to the gradient's max magnitude.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton.language as tl

from conftest import requires_cuda
from gcvit import functional as ref
from gcvit_kernels import window_attention as wa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(batch, height, width, window, num_heads, head_dim, is_global, dtype=torch.float32,
                num_global_queries=None, strided=False, global_query_4d=False):
    """qkv map, table, global query; ``strided`` gives views with non-trivial strides (last dim stride 1)."""
    wh, ww = window
    channels = num_heads * head_dim
    slots = 2 if is_global else 3
    if strided:
        # (B, W, H, S*C + 8) storage read transposed and sliced: only the last dim has stride 1
        qkv = torch.randn(batch, width, height, slots * channels + 8, dtype=dtype, device=DEVICE)
        qkv = qkv.transpose(1, 2)[..., 3:3 + slots * channels]
    else:
        qkv = torch.randn(batch, height, width, slots * channels, dtype=dtype, device=DEVICE)
    table = 0.5 * torch.randn((2 * wh - 1) * (2 * ww - 1), num_heads, dtype=dtype, device=DEVICE)
    global_query = None
    if is_global:
        num_global_queries = num_global_queries or batch
        global_query = torch.randn(num_global_queries, wh * ww, channels + (5 if strided else 0), dtype=dtype,
                                   device=DEVICE)[..., :channels]
        if global_query_4d:
            global_query = global_query.reshape(num_global_queries, wh, ww, channels)
    return qkv, table, global_query


def _grads(fn, qkv, table, global_query, grad_out):
    inputs = [t.detach().requires_grad_() for t in (qkv, table) + ((global_query,) if global_query is not None else ())]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


def _check_against_reference(qkv, table, global_query, num_heads, window, scale=None, grad_out=None,
                             fwd_atol=2e-5, grad_rtol=1e-4):
    def fused(q, t, *g):
        return wa.window_attention_triton(q, t, num_heads, window, g[0] if g else None, scale)

    def reference(q, t, *g):
        return ref.window_attention(q, t, num_heads, window, g[0] if g else None, scale)

    if grad_out is None:
        channels = qkv.shape[-1] // (3 if global_query is None else 2)
        grad_out = torch.randn(*qkv.shape[:3], channels, dtype=qkv.dtype, device=qkv.device)
    expected, expected_grads = _grads(reference, qkv, table, global_query, grad_out)
    out, grads = _grads(fused, qkv, table, global_query, grad_out)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=fwd_atol, rtol=0)
    for name, got, want in zip(("qkv", "rel_pos_bias_table", "global_query"), grads, expected_grads):
        assert got.shape == want.shape, name
        tol = grad_rtol * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=lambda m: f"grad {name}: {m}")


# (batch, height, width, window, heads, head_dim): windows per image and batches not powers of two
SHAPES = {
    "N49": (3, 21, 7, (7, 7), 2, 16),
    "N144": (1, 24, 12, (12, 12), 1, 32),
    "N196": (1, 14, 14, (14, 14), 1, 16),
    "rect10x6": (2, 10, 18, (10, 6), 1, 16),
}


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_forward_and_gradients_match_reference(shape, is_global):
    batch, height, width, window, heads, head_dim = SHAPES[shape]
    qkv, table, global_query = make_inputs(batch, height, width, window, heads, head_dim, is_global)
    _check_against_reference(qkv, table, global_query, heads, window)


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_strided_inputs_and_grad_out(is_global):
    qkv, table, global_query = make_inputs(2, 14, 21, (7, 7), 2, 16, is_global, strided=True, global_query_4d=True)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    grad_out = torch.randn(2, 21, 14, 32, device=DEVICE).transpose(1, 2)  # non-contiguous upstream gradient
    _check_against_reference(qkv, table, global_query, 2, (7, 7), scale=0.3, grad_out=grad_out)


def test_global_queries_shared_by_several_images():
    # G = 2 global queries for 3 images x 2 windows: query g serves windows 3g .. 3g + 2 (across an image edge)
    qkv, table, global_query = make_inputs(3, 14, 7, (7, 7), 1, 16, True, num_global_queries=2)
    _check_against_reference(qkv, table, global_query, 1, (7, 7))


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_multi_block_tiles_and_multi_window_chunks(monkeypatch, is_global):
    """Force 16-token blocks on a 49-token window (online softmax over 4 key blocks, the read-modify-write
    bias-gradient scratch) and 2 programs' worth of chunks (several windows per chunk)."""
    blocks = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    for name in ("forward_config", "backward_dkdv_config", "backward_dq_dbias_config"):
        monkeypatch.setattr(wa, name, lambda tokens, head_dim, dtype: dict(blocks))
    monkeypatch.setattr(wa, "_DQ_TARGET_PROGRAMS", 2)
    monkeypatch.setattr(wa, "_INTERPRETER_BLOCK", None)
    qkv, table, global_query = make_inputs(2, 14, 7, (7, 7), 1, 16, is_global)
    geo = wa._Geometry(qkv, 1, 7, 7, global_query)
    _, chunks_per_group, windows_per_chunk, _ = wa._chunking(geo, num_q_blocks=4)
    assert chunks_per_group == 1 and windows_per_chunk == 2
    _check_against_reference(qkv, table, global_query, 1, (7, 7))


@pytest.mark.slow
@pytest.mark.parametrize("window", [(24, 24), (32, 32)], ids=["N576", "N1024"])
def test_large_windows_match_reference(window):
    qkv, table, global_query = make_inputs(1, *window, window, 1, 16, False)
    _check_against_reference(qkv, table, global_query, 1, window)


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_fp64_gradcheck(is_global):
    # rectangular 3x2 window (N = 6, padded to 16), 2 images x 2 windows; every differentiable input checked
    qkv, table, global_query = make_inputs(2, 3, 4, (3, 2), 1, 16, is_global, dtype=torch.float64)
    inputs = (qkv, table) + ((global_query,) if is_global else ())
    inputs = tuple(t.detach().requires_grad_() for t in inputs)

    def fn(q, t, *g):
        return wa.window_attention_triton(q, t, 1, (3, 2), g[0] if g else None)

    torch.testing.assert_close(fn(*inputs), ref.window_attention(*inputs[:2], 1, (3, 2), *inputs[2:]), atol=1e-12,
                               rtol=0)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_bias_and_global_query_gradients_are_bitwise_deterministic(monkeypatch, is_global):
    monkeypatch.setattr(wa, "_DQ_TARGET_PROGRAMS", 4)  # several chunks per image, several windows per chunk
    qkv, table, global_query = make_inputs(2, 14, 21, (7, 7), 1, 16, is_global)
    grad_out = torch.randn(2, 14, 21, 16, device=DEVICE)

    def run():
        return _grads(lambda q, t, *g: wa.window_attention_triton(q, t, 1, (7, 7), g[0] if g else None),
                      qkv, table, global_query, grad_out)[1]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ bad inputs


def _bad(**changes):
    qkv, table, global_query = make_inputs(1, 14, 14, (7, 7), 2, 16, False)
    args = dict(qkv=qkv, rel_pos_bias_table=table, num_heads=2, window_size=(7, 7), global_query=global_query)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(qkv=torch.randint(0, 3, (1, 14, 14, 96), dtype=torch.int32)), TypeError, "qkv dtype"),
    (dict(qkv=torch.randn(14, 14, 96)), ValueError, r"\(B, H, W, S\*C\)"),
    (dict(qkv=torch.randn(1, 14, 96, 14).transpose(2, 3)), ValueError, "stride 1"),
    (dict(window_size=(5, 5)), ValueError, "not divisible"),
    (dict(num_heads=5), ValueError, "num_heads"),
    (dict(qkv=torch.randn(1, 14, 14, 3 * 2 * 24)), ValueError, "head_dim 24"),
    (dict(rel_pos_bias_table=torch.randn(168, 2)), ValueError, r"rel_pos_bias_table must be \(169, 2\)"),
    (dict(qkv=torch.randn(1, 14, 14, 64), global_query=torch.randn(1, 48, 32)), ValueError, "global_query must be"),
    (dict(qkv=torch.randn(1, 14, 14, 64), global_query=torch.randn(3, 49, 32)), ValueError, "not divisible by 3"),
    (dict(qkv=torch.randn(1, 14, 14, 64), global_query=torch.randn(1, 49, 32, dtype=torch.float16)), TypeError,
     "global_query dtype"),
    (dict(rel_pos_bias_table=torch.randn(169, 2, device="meta")), ValueError, "one device"),
])
def test_bad_inputs_raise_before_launch(changes, error, match):
    args = _bad(**changes)
    with pytest.raises(error, match=match):
        wa.window_attention_triton(**args)
    reason = wa.unsupported_reason(**args)
    if match != "one device":  # unsupported_reason does not look at devices
        assert reason is not None and reason.strip()


def test_fp32_head_dim_128_runs_forward_only():
    """No fp32 backward tile at head_dim 128 compiles without spilling: gradients are turned away up front,
    the forward still runs."""
    qkv, table, _ = make_inputs(1, 7, 7, (7, 7), 1, 128, False)
    with torch.no_grad():
        torch.testing.assert_close(wa.window_attention_triton(qkv, table, 1, (7, 7)),
                                   ref.window_attention(qkv, table, 1, (7, 7)), atol=2e-5, rtol=0)
    assert wa.unsupported_reason(qkv, table, 1, 7) is None
    table.requires_grad_()
    assert "no Triton backward" in wa.unsupported_reason(qkv, table, 1, 7)
    with pytest.raises(ValueError, match="no Triton backward for torch.float32 at head_dim 128"):
        wa.window_attention_triton(qkv, table, 1, 7)
    assert wa.has_backward_tiles(torch.float16, 128) and wa.has_backward_tiles(torch.float32, 64)


def test_unsupported_reason_accepts_valid_inputs():
    for is_global in (False, True):
        qkv, table, global_query = make_inputs(1, 14, 14, (7, 7), 2, 32, is_global)
        assert wa.unsupported_reason(qkv, table, 2, (7, 7), global_query) is None
        assert wa.unsupported_reason(qkv, table, 2, 7, global_query) is None


# ---------------------------------------------------------------------------------------- AOT compile for sm_80/90

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FP32_POINTERS = ("lse_ptr", "grad_global_query_partial_ptr", "grad_bias_partial_ptr", "grad_table_ptr")


def _signature(kernel, dtype, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else _POINTER_TYPES[dtype]
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def aot_jobs(window, head_dim, dtype, is_global, num_heads=4):
    """Every kernel of one (window, head_dim, dtype, local/global) case with the launch config it would get."""
    wh, ww = window
    tokens = wh * ww
    common = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, WINDOW_H=wh, WINDOW_W=ww, GLOBAL_QUERY=is_global,
                  ACC_DTYPE=tl.float32, INPUT_PRECISION=wa._input_precision(dtype))
    launches = [(wa._window_attention_fwd_kernel, wa.forward_config(tokens, head_dim, dtype))]
    if wa.has_backward_tiles(dtype, head_dim):  # else the input check turns gradients away
        launches += [(wa._window_attention_bwd_dkdv_kernel, wa.backward_dkdv_config(tokens, head_dim, dtype)),
                     (wa._window_attention_bwd_dq_dbias_kernel, wa.backward_dq_dbias_config(tokens, head_dim, dtype)),
                     (wa._rel_pos_bias_grad_gather_kernel, wa.gather_config(tokens))]
    jobs = []
    for kernel, config in launches:
        constexprs = {k: v for k, v in {**common, **config}.items() if k in kernel.arg_names}
        jobs.append(dict(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs,
                         num_warps=config["num_warps"], num_stages=config.get("num_stages", 2)))
    return jobs


# Launch configs depend on (tokens, head_dim, dtype). The default run compiles three cases that between them
# take every kernel and code path: N = 144 (padded, several key blocks: bias-gradient scratch) local fp16,
# N = 49 (one key block: register bias-gradient tile) global bf16, and N = 49 global fp32 at GC ViT's head_dim
# (3xTF32 dots; its dq / bias-gradient kernel used to spill). The sweep over every variant window, head_dim 16..128,
# dtype and local/global (about 1,000 compiles, 10 minutes on 2 cores with a cold Triton cache) is marked slow.
AOT_DEFAULT_CASES = [((12, 12), 32, torch.float16, False), ((7, 7), 32, torch.bfloat16, True),
                     ((7, 7), 32, torch.float32, True)]
AOT_SWEEP_CASES = [(window, head_dim, dtype, is_global)
                   for window in ((7, 7), (12, 12), (14, 14), (16, 16), (24, 24), (32, 32), (10, 6))
                   for head_dim in (16, 32, 64, 128)
                   for dtype in (torch.float16, torch.bfloat16, torch.float32)
                   for is_global in (False, True)]


def _dedupe(jobs):
    seen, unique = set(), []
    for job in jobs:
        key = (job["fn"].fn.__name__,
               tuple(sorted(job["signature"].items())),
               tuple(sorted((k, str(v)) for k, v in job["constexprs"].items())),
               job["num_warps"], job["num_stages"])
        if key not in seen:
            seen.add(key)
            unique.append(job)
    return unique


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    import triton_aot

    jobs = _dedupe([job for case in AOT_DEFAULT_CASES for job in aot_jobs(*case)])
    reports = triton_aot.assert_all_compile_clean(jobs, archs=(80, 90))
    assert len(reports) == 2 * len(jobs) and all(r["registers"] > 0 for r in reports)


@pytest.mark.slow
def test_every_launch_config_compiles_for_sm80_and_sm90_without_spills():
    import triton_aot

    jobs = _dedupe([job for case in AOT_SWEEP_CASES for job in aot_jobs(*case)])
    triton_aot.assert_all_compile_clean(jobs, archs=(80, 90))


# ------------------------------------------------------------------------------------- custom ops and compile

_OP_SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from gcvit import functional as ref
    from gcvit_kernels import window_attention as wa

    # test-only, in this throwaway process: route the ops' CPU dispatch to the Triton launches (interpreter)
    torch.library.register_kernel("gcvit::window_attention_fwd", "cpu", wa.window_attention_fwd_triton)
    torch.library.register_kernel("gcvit::window_attention_bwd", "cpu", wa.window_attention_bwd_triton)
    fwd, bwd = torch.ops.gcvit.window_attention_fwd, torch.ops.gcvit.window_attention_bwd
    assert str(fwd.default._schema) == "gcvit::window_attention_fwd" + wa.WINDOW_ATTENTION_FWD_SCHEMA == (
        "gcvit::window_attention_fwd(Tensor qkv, Tensor rel_pos_bias_table, Tensor? global_query, int num_heads, "
        "int window_h, int window_w, float scale) -> (Tensor out, Tensor lse)"), fwd.default._schema
    assert str(bwd.default._schema) == "gcvit::window_attention_bwd" + wa.WINDOW_ATTENTION_BWD_SCHEMA, \\
        bwd.default._schema

    torch.manual_seed(0)
    for is_global in (False, True):
        qkv = torch.randn(2, 3, 4, (2 if is_global else 3) * 16, dtype=torch.float64, requires_grad=True)
        table = torch.randn(15, 1, dtype=torch.float64, requires_grad=True)
        gq = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True) if is_global else None
        torch.library.opcheck(fwd.default, (qkv, table, gq, 1, 3, 2, 0.25))
        out, lse = fwd(qkv, table, gq, 1, 3, 2, 0.25)
        grad_out = torch.randn_like(out)
        # the backward op has no double backward, so its AOT-dispatch (autograd) check does not apply
        torch.library.opcheck(bwd.default, (grad_out, qkv.detach(), table.detach(), gq, out.detach(), lse, 1, 3, 2,
                                            0.25, True), test_utils=("test_schema", "test_faketensor"))
        inputs = [t for t in (qkv, table, gq) if t is not None]
        compiled = torch.compile(wa.window_attention, fullgraph=True, backend="aot_eager")
        got = compiled(qkv, table, 1, (3, 2), gq, 0.25)
        want = ref.window_attention(qkv, table, 1, (3, 2), gq, 0.25)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    print("OK")
''')


def test_custom_ops_opcheck_and_fullgraph_compile():
    """opcheck (schema, fake impls, autograd registration, AOT dispatch) and a fullgraph torch.compile trace.

    Runs in a fresh process because it registers test-only CPU kernels (the Triton interpreter) for the ops,
    which must not leak into the C++ CPU kernels gcvit_kernels.cpu registers for the rest of the suite."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _OP_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-6000:]


def test_benchmark_module_smoke():
    """The benchmark file's case table and step builders, run on one tiny case (interpreter on CPU)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "test_bench_window_attention.py")
    spec = importlib.util.spec_from_file_location("bench_window_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = bench.attention_cases()
    assert {(c["window"], c["fmap"]) for c in cases if c["variant"] == "large384"} == {(12, 96), (12, 48), (24, 24),
                                                                                     (12, 12)}
    assert all(c["channels"] // c["num_heads"] == 32 for c in cases)
    case = dict(variant="smoke", stage=0, batch=1, fmap=7, window=7, channels=16, num_heads=1, is_global=True)
    inputs = bench.make_inputs(case, "cpu", torch.float32)
    outs = {name: bench.implementation(name, case)(*inputs) for name in ("fused", "reference", "sdpa")}
    for name in ("fused", "sdpa"):
        torch.testing.assert_close(outs[name], outs["reference"], atol=2e-5, rtol=0)
    bench.make_step(bench.implementation("fused", case), inputs, "fwd_bwd")()
    assert bench.workload(case, torch.float16, "fwd_bwd")["flops"] > bench.workload(case, torch.float16, "fwd")["flops"]


def test_empty_batch():
    qkv, table, _ = make_inputs(0, 14, 14, (7, 7), 2, 16, False)
    qkv.requires_grad_()
    out = wa.window_attention_triton(qkv, table, 2, (7, 7))
    assert out.shape == (0, 14, 14, 32)
    (grad_qkv,) = torch.autograd.grad(out.sum(), qkv)
    assert grad_qkv.shape == qkv.shape


# ------------------------------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("window, head_dim", [((7, 7), 32), ((12, 12), 32), ((14, 14), 64), ((24, 24), 32),
                                              ((32, 32), 16), ((10, 6), 128)])
def test_half_precision_matches_fp32_reference(window, head_dim, is_global, dtype):
    """fp16 / bf16 inputs against the reference run in fp32 on the same (rounded) inputs; tolerances are a few
    ulps of the output dtype (fp16 eps 1e-3, bf16 eps 8e-3) on O(1) values."""
    wh, ww = window
    qkv, table, global_query = make_inputs(2, 2 * wh, 3 * ww, window, 2, head_dim, is_global, dtype=dtype)
    grad_out = torch.randn(2, 2 * wh, 3 * ww, 2 * head_dim, device="cuda", dtype=dtype)
    inputs = [t for t in (qkv, table, global_query) if t is not None]
    fused_out, fused_grads = _grads(lambda q, t, *g: wa.window_attention(q, t, 2, window, g[0] if g else None),
                                    qkv, table, global_query, grad_out)
    ref_out, ref_grads = _grads(lambda q, t, *g: ref.window_attention(q, t, 2, window, g[0] if g else None),
                                *(t.float() if t is not None else None for t in (qkv, table, global_query)),
                                grad_out.float())
    atol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert fused_out.dtype == dtype and len(fused_grads) == len(inputs)
    torch.testing.assert_close(fused_out.float(), ref_out, atol=atol, rtol=0)
    for got, want in zip(fused_grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=atol * max(1.0, want.abs().max().item()), rtol=0)


@requires_cuda
def test_grid_past_65535_programs():
    # 70,000 windows x 1 head x 1 query block: every program index is on grid x
    qkv, table, _ = make_inputs(70_000, 7, 7, (7, 7), 1, 16, False, dtype=torch.float16)
    out = wa.window_attention(qkv, table, 1, (7, 7))
    torch.testing.assert_close(out[-5:].float(), ref.window_attention(qkv[-5:].float(), table.float(), 1, (7, 7)),
                               atol=4e-3, rtol=0)


@requires_cuda
def test_cuda_bias_gradient_bitwise_deterministic():
    qkv, table, global_query = make_inputs(16, 28, 28, (7, 7), 4, 32, True, dtype=torch.float16)
    grad_out = torch.randn(16, 28, 28, 128, device="cuda", dtype=torch.float16)

    def run():
        return _grads(lambda q, t, g: wa.window_attention(q, t, 4, (7, 7), g), qkv, table, global_query, grad_out)[1]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
