"""Tests of the Triton Fused-MBConv (gcvit_kernels.mbconv) against gcvit.functional.fused_mbconv.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which is slow, so the CPU
shapes are small but chosen to cross every tile edge: odd spatial sizes (5, 7, 9, 13), channel counts
that are not a multiple of any block size, several pixel and channel tiles, several K chunks, a
split-K weight gradient with more than one split, batch 1 and 3, NCHW and channels_last.
fp16/bf16 run only on CUDA (the interpreter's bf16 tl.dot is not trustworthy).
"""
import importlib.util
import inspect
import os
import sys

import pytest
import torch

from conftest import HAS_CUDA, requires_cuda
from gcvit import functional as ref
from gcvit_kernels import mbconv

DEVICE = "cuda" if HAS_CUDA else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(b, c, h, w, dtype=torch.float32, channels_last=False, device=DEVICE, c_rd=None):
    c_rd = c_rd or max(1, c // 4)
    x = torch.randn(b, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weights = [
        torch.randn(c, 1, 3, 3, dtype=dtype, device=device) * 0.4,
        torch.randn(c_rd, c, 1, 1, dtype=dtype, device=device) * c ** -0.5,
        torch.randn(c, c_rd, 1, 1, dtype=dtype, device=device) * c_rd ** -0.5,
        torch.randn(c, c, 1, 1, dtype=dtype, device=device) * c ** -0.5,
    ]
    return x, weights


def run_with_grads(fn, x, weights, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in [x, *weights]]
    y = fn(*leaves)
    y.backward(grad_out)
    return y.detach(), [t.grad for t in leaves]


def reference_fp64(x, weights, grad_out):
    """The reference in fp64 on the same (rounded) inputs: the error measured is the kernel's alone."""
    return run_with_grads(ref.fused_mbconv, x.double(), [w.double() for w in weights], grad_out.double())


GRAD_NAMES = ("x", "dw_weight", "se_reduce_weight", "se_expand_weight", "pw_weight")


def assert_matches_reference(y, grads, y_ref, grads_ref, rtol, atol):
    """Output and each gradient within rtol + atol * max|reference| (per tensor)."""
    for name, got, want in [("y", y, y_ref), *zip(GRAD_NAMES, grads, grads_ref)]:
        want = want.to(got.dtype)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- fp32 / fp64

# (B, C, H, W, channels_last): every case crosses at least one tile edge; see the module docstring.
# Tiles (see mbconv.DWCONV_CONFIG / GEMM_CONFIGS): 32 channels x 32 pixels for the depthwise
# kernels, 64 x 64 with K chunks of 16 for the GEMMs.
FP32_CASES = [
    (1, 24, 7, 7, False),    # batch 1; C below every block; 2 K chunks (16 + 8); 49 pixels = 32 + 17
    (3, 24, 7, 7, True),     # batch 3, channels_last
    (1, 40, 13, 13, False),  # 169 pixels: 3 GEMM pixel tiles, 6 depthwise ones; 2 channel tiles (32 + 8)
    (2, 36, 9, 11, True),    # H != W, channels_last, 2 channel tiles (32 + 4), 3 K chunks (16 + 16 + 4)
]


@pytest.mark.parametrize("b,c,h,w,channels_last", FP32_CASES)
def test_fp32_forward_backward_match_reference(b, c, h, w, channels_last):
    x, weights = make_inputs(b, c, h, w, channels_last=channels_last)
    grad_out = torch.randn_like(x)
    y, grads = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
    y_ref, grads_ref = reference_fp64(x, weights, grad_out)
    # fp32 with fp32 accumulation over at most B*H*W*C terms of these sizes: 1e-5 relative to the
    # tensor's largest entry leaves ~30x margin over the errors observed (<= 3e-7 relative)
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=1e-5, atol=1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format), "output must keep x's memory format"
    assert grads[0].is_contiguous(memory_format=memory_format), "grad_x must keep x's memory format"


def test_fp64_gradcheck():
    # channels_last only: NCHW gradients are held to 1e-12 against the reference's autograd below
    x, weights = make_inputs(2, 8, 5, 5, dtype=torch.float64, channels_last=True, c_rd=3)
    inputs = [t.requires_grad_() for t in [x, *weights]]
    assert torch.autograd.gradcheck(mbconv.fused_mbconv_triton, inputs, fast_mode=True)


def test_fp64_matches_reference_tightly():
    # fp64 end to end (fp64 tl.dot is exact in the interpreter): any indexing or masking slip shows up
    # far above 1e-12, whatever the tolerance of the fp32 tests hides
    x, weights = make_inputs(3, 20, 7, 9, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    y, grads = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
    y_ref, grads_ref = reference_fp64(x, weights, grad_out)
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=1e-12, atol=1e-12)


def test_noncontiguous_grad_out_is_read_through_its_strides():
    x, weights = make_inputs(1, 24, 7, 7)
    grad_out = torch.randn(1, 7, 7, 24).permute(0, 3, 2, 1)  # neither NCHW nor channels_last
    y, grads = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
    y_ref, grads_ref = reference_fp64(x, weights, grad_out)
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- determinism

def test_kernels_use_no_atomics():
    # determinism of the weight gradients rests on fixed-order partial-sum buffers; an atomic add
    # anywhere in the module would silently break it on the GPU (the interpreter is always sequential)
    source = inspect.getsource(mbconv)
    assert "atomic_" not in source


def test_grad_weight_split_depends_on_shapes_only():
    # the split-K summation order is fixed by the shapes (not the device's SM count), and the test
    # shape really splits, so the fixed-order host reduction is exercised above
    assert mbconv.grad_weight_splits(64, 64 * 112 * 112, 64, 64, 16) == mbconv.grad_weight_splits(
        64, 64 * 112 * 112, 64, 64, 16)
    assert mbconv.grad_weight_splits(36, 2 * 9 * 11, 64, 64, 16) > 1
    assert mbconv.grad_weight_splits(1536, 16, 128, 128, 16) == 1


@requires_cuda
@pytest.mark.parametrize("c,hw", [(64, 56), (512, 7)])
def test_weight_gradients_bitwise_deterministic_cuda(c, hw):
    x, weights = make_inputs(8, c, hw, hw)
    grad_out = torch.randn_like(x)
    _, first = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
    for _ in range(3):
        _, again = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), f"grad of {name} differs between identical runs"


# ---------------------------------------------------------------------------------------------- fp16 / bf16

LOW_PRECISION_CASES = [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7), (3, 72, 13, 13)]


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("b,c,h,w", LOW_PRECISION_CASES)
def test_low_precision_cuda(b, c, h, w, channels_last, dtype, tol):
    x, weights = make_inputs(b, c, h, w, dtype=dtype, channels_last=channels_last)
    grad_out = torch.randn_like(x)
    y, grads = run_with_grads(mbconv.fused_mbconv, x, weights, grad_out)
    y_ref, grads_ref = reference_fp64(x, weights, grad_out)
    # inputs rounded to 8 (bf16) / 11 (fp16) mantissa bits, fp32 accumulation, output rounded once
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("b,c,h,w", LOW_PRECISION_CASES)
def test_fp32_cuda(b, c, h, w):
    x, weights = make_inputs(b, c, h, w)
    grad_out = torch.randn_like(x)
    y, grads = run_with_grads(mbconv.fused_mbconv, x, weights, grad_out)
    y_ref, grads_ref = reference_fp64(x, weights, grad_out)
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- input checks

def _bad_inputs():
    x, (dw, se_r, se_e, pw) = make_inputs(1, 8, 5, 5, device="cpu")
    return [
        ("x 3-D", (x[0], dw, se_r, se_e, pw), ValueError, "4-D"),
        ("x int", (x.int(), dw, se_r, se_e, pw), TypeError, "float16, bfloat16, float32 or float64"),
        ("weight dtype", (x, dw.double(), se_r, se_e, pw), TypeError, "dw_weight must have x's dtype"),
        ("dw shape", (x, dw[:, :, :2], se_r, se_e, pw), ValueError, r"dw_weight must have shape \(8, 1, 3, 3\)"),
        ("se_reduce shape", (x, dw, se_r[:, :4], se_e, pw), ValueError, r"se_reduce_weight must have shape \(C_rd, 8"),
        ("se_expand shape", (x, dw, se_r, se_e[:, :1], pw), ValueError, r"se_expand_weight must have shape \(8, 2, 1, 1\)"),
        ("pw shape", (x, dw, se_r, se_e, pw[:4]), ValueError, r"pw_weight must have shape \(8, 8, 1, 1\)"),
        ("not a tensor", (x, dw, se_r, se_e, pw.tolist()), TypeError, "pw_weight must be a torch.Tensor"),
        ("empty", (x[:0], dw, se_r, se_e, pw), ValueError, "no empty dimension"),
        ("x strided", (x[..., ::2], dw, se_r, se_e, pw), ValueError, "NCHW-contiguous or channels_last"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("entry", ["fused_mbconv", "fused_mbconv_triton"])
def test_bad_inputs_raise_before_launch(case, entry, monkeypatch):
    _, args, exc, message = case

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before the inputs were validated")

    monkeypatch.setattr(mbconv, "_pooled_mean", no_launch)
    with pytest.raises(exc, match=message):
        getattr(mbconv, entry)(*args)
    assert mbconv.unsupported_reason(*args) is not None


def test_device_mismatch_is_a_value_error():
    x, weights = make_inputs(1, 8, 5, 5, device="cpu")
    weights[3] = weights[3].to("meta")
    with pytest.raises(ValueError, match="pw_weight is on meta but x is on cpu"):
        mbconv.fused_mbconv_triton(x, *weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unsupported_reason_accepts_every_model_shape(dtype, channels_last):
    # shapes and dtypes only, no device: meta tensors of the largest and smallest blocks of the contract
    for c, hw in [(64, 128), (1536, 7), (96, 64), (192, 28)]:
        x, weights = make_inputs(2, c, hw, hw, dtype=dtype, channels_last=channels_last, device="meta")
        assert mbconv.unsupported_reason(x, *weights) is None


# ---------------------------------------------------------------------------------------------- custom ops

@pytest.fixture
def triton_cpu_kernels():
    """Run the Triton path (interpreter) as the ops' CPU kernels for one test, then restore whatever
    CPU kernels were registered before (the C++ ones of gcvit_kernels.cpu, or none): the dispatcher
    keeps earlier registrations and falls back to them when this Library is destroyed."""
    if HAS_CUDA:
        yield
        return
    lib = torch.library.Library("gcvit", "IMPL")
    lib.impl("fused_mbconv_fwd", mbconv._forward, "CPU")
    lib.impl("fused_mbconv_bwd", mbconv._backward, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def test_opcheck_forward_op(triton_cpu_kernels):
    x, weights = make_inputs(1, 8, 5, 5)
    args = [t.requires_grad_() for t in [x, *weights]]
    torch.library.opcheck(torch.ops.gcvit.fused_mbconv_fwd.default, args)


def test_opcheck_backward_op(triton_cpu_kernels):
    x, weights = make_inputs(1, 8, 5, 5, channels_last=True)
    # the backward op is not differentiable (no double backward), so no autograd check
    torch.library.opcheck(torch.ops.gcvit.fused_mbconv_bwd.default, [torch.randn_like(x), x, *weights],
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_autograd_matches_triton_path(triton_cpu_kernels):
    x, weights = make_inputs(2, 12, 5, 7, channels_last=True)
    grad_out = torch.randn_like(x)
    y, grads = run_with_grads(mbconv.fused_mbconv, x, weights, grad_out)
    y_direct, grads_direct = run_with_grads(mbconv.fused_mbconv_triton, x, weights, grad_out)
    for got, want in zip([y, *grads], [y_direct, *grads_direct]):
        assert torch.equal(got, want)


def test_backward_op_rejects_a_bad_grad_out(triton_cpu_kernels):
    x, weights = make_inputs(1, 8, 5, 5)
    with pytest.raises(ValueError, match=r"grad_out must have x's shape \(1, 8, 5, 5\)"):
        torch.ops.gcvit.fused_mbconv_bwd(torch.randn(1, 8, 5, 4), x, *weights)
    with pytest.raises(TypeError, match="grad_out must have x's dtype torch.float32"):
        torch.ops.gcvit.fused_mbconv_bwd(torch.randn_like(x).double(), x, *weights)


def test_ops_have_cuda_and_fake_kernels():
    for name in ("gcvit::fused_mbconv_fwd", "gcvit::fused_mbconv_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"), name


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(triton_cpu_kernels, backend):
    torch._dynamo.reset()
    x, weights = make_inputs(1, 8, 5, 5)
    grad_out = torch.randn_like(x)

    def block(x, *weights):
        return mbconv.fused_mbconv(x, *weights) * 2.0

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y, grads = run_with_grads(compiled, x, weights, grad_out)
    y_ref, grads_ref = run_with_grads(lambda *a: ref.fused_mbconv(*a) * 2.0, x, weights, grad_out)
    assert_matches_reference(y, grads, y_ref, grads_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- AOT compile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_aot  # noqa: E402  (tests/triton_aot.py, shared by every kernel test)

_STRIDES_X = dict(stride_xb="i32", stride_xc="i32", stride_xh="i32", stride_xw="i32")
_STRIDES_G = dict(stride_gb="i32", stride_gc="i32", stride_gh="i32", stride_gw="i32")
_CHW = dict(C="i32", H="i32", W="i32")


def aot_jobs(dtype: str):
    """Every kernel with every launch config the wrappers can pick, for inputs of Triton type ``dtype``."""
    import triton.language as tl

    t, acc = "*" + dtype, "*fp32"
    jobs = []

    def add(fn, signature, constexprs, cfg):
        jobs.append(dict(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                         constexprs=constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))

    d = mbconv.DWCONV_CONFIG
    tile = dict(ACC=tl.float32, BLOCK_C=d["BLOCK_C"], BLOCK_P=d["BLOCK_P"])
    add(mbconv._dwconv_gelu_pool_kernel, dict(x_ptr=t, dw_ptr=t, partial_ptr=acc, **_CHW, **_STRIDES_X), tile, d)
    add(mbconv._dwconv_grad_kernel, dict(x_ptr=t, dw_ptr=t, grad_u_ptr=acc, gate_ptr=acc, grad_pool_ptr=acc,
                                         grad_d_ptr=acc, partial_ptr=acc, **_CHW, **_STRIDES_X), tile, d)
    add(mbconv._dwconv_transpose_residual_kernel, dict(grad_d_ptr=acc, flipped_dw_ptr=t, grad_out_ptr=t,
                                                       grad_x_ptr=t, **_CHW, **_STRIDES_X, **_STRIDES_G), tile, d)
    for g in mbconv.GEMM_CONFIGS:
        add(mbconv._pw_conv_kernel, dict(x_ptr=t, dw_ptr=t, gate_ptr=acc, pw_ptr=t, y_ptr=t, **_CHW, **_STRIDES_X),
            dict(ACC=tl.float32, BLOCK_O=g["BLOCK_M"], BLOCK_P=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"]), g)
        add(mbconv._pw_conv_grad_input_kernel, dict(grad_out_ptr=t, pw_ptr=t, x_ptr=t, dw_ptr=t, grad_u_ptr=acc,
                                                    partial_ptr=acc, **_CHW, **_STRIDES_G, **_STRIDES_X),
            dict(ACC=tl.float32, BLOCK_C=g["BLOCK_M"], BLOCK_P=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"]), g)
        add(mbconv._pw_conv_grad_weight_kernel, dict(grad_out_ptr=t, x_ptr=t, dw_ptr=t, gate_ptr=acc, partial_ptr=acc,
                                                     **_CHW, K="i32", K_PER_SPLIT="i32", **_STRIDES_G, **_STRIDES_X),
            dict(ACC=tl.float32, BLOCK_O=g["BLOCK_M"], BLOCK_C=g["BLOCK_M"], BLOCK_K=g["BLOCK_K"]), g)
    return jobs


def _assert_aot_clean(dtypes):
    jobs = [job for dtype in dtypes for job in aot_jobs(dtype)]
    kernels = {name for name in vars(mbconv) if name.startswith("_") and name.endswith("_kernel")}
    assert {job["fn"].__name__ for job in jobs} == kernels, "every kernel of the module must be compiled"
    triton_aot.assert_all_compile_clean(jobs, archs=(80, 90))


def test_aot_compile_every_kernel_and_config_fp32_bf16():
    # fp32 exercises the FMA tl.dot path (input_precision="ieee"), bf16 the tensor-core path
    _assert_aot_clean(["fp32", "bf16"])


@pytest.mark.slow
def test_aot_compile_every_kernel_and_config_fp16():
    _assert_aot_clean(["fp16"])


# ---------------------------------------------------------------------------------------------- benchmark smoke

def test_benchmark_measure_runs_at_a_tiny_shape():
    # runs the benchmark file's measurement at a tiny shape on this device, so the file is exercised in CI
    path = os.path.join(REPO, "benchmarks", "test_bench_mbconv.py")
    spec = importlib.util.spec_from_file_location("_bench_mbconv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(channels=8, size=5, batch=1, dtype=torch.float32, device=DEVICE, mode="fwd_bwd",
                           compile_backend="eager", reps=1)
    for key in ("fused_ms", "eager_ms", "compiled_ms", "speedup_vs_eager", "speedup_vs_compiled", "gbps"):
        assert result[key] > 0, key
