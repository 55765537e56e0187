"""The C++ CPU kernels (csrc/gcvit_cpu.cpp via gcvit_kernels.cpu) against the reference math.

Tolerances: fp32 outputs atol=rtol=2e-5 (observed max abs error ~1e-6); bf16 outputs (bf16 inputs, fp32
accumulation, bf16 rounding of the result) compared with the fp32 reference on the same bf16-rounded
inputs at atol=rtol=3e-2 (bf16 has 8 bits of mantissa: 2^-8 = 0.4% per rounding).
The whole file is skipped (with the build error as reason) only when the extension cannot be built.
"""
import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gcvit import functional as ref
from gcvit_kernels import cpu

EXT = cpu.load()
pytestmark = pytest.mark.skipif(EXT is None, reason=f"C++ CPU extension unavailable: {cpu.load_error()}")

ATOL32 = RTOL32 = 2e-5
ATOL16 = RTOL16 = 3e-2


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_attention(b, h, w, c, heads, wh, ww, is_global, dtype=torch.float32, gq_flat=False, padded=False):
    s = 2 if is_global else 3
    if padded:  # arbitrary strides except the last: a slice of a wider map
        qkv = torch.randn(b, h, w, s * c + 5, dtype=dtype)[..., 2:2 + s * c]
    else:
        qkv = torch.randn(b, h, w, s * c, dtype=dtype)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, dtype=dtype)
    gq = None
    if is_global:
        gq = torch.randn(b, wh * ww, c, dtype=dtype) if gq_flat else torch.randn(b, wh, ww, c, dtype=dtype)
    return qkv, table, gq, (c // heads) ** -0.5


# (B, H, W, C, heads, wh, ww): gcvit-like 7x7, 12x12, rectangular; odd batches/window counts; C and head_dim
# not multiples of the vector width (8)
ATTN_CASES = [
    (2, 14, 14, 64, 2, 7, 7),
    (3, 21, 14, 36, 3, 7, 7),
    (1, 24, 36, 48, 4, 12, 12),
    (3, 10, 9, 20, 4, 5, 3),
    (1, 7, 7, 512, 16, 7, 7),
]


def reference_lse(qkv, table, gq, heads, wh, ww, scale):
    q, k, v, t, n, c, d = cpu._split_windows(qkv, gq, heads, wh, ww, torch.float64)
    bias, _ = cpu._bias(table, wh, ww, torch.float64)
    s = (q * scale) @ k.transpose(-2, -1) + bias
    return torch.logsumexp(s, -1).reshape(t, heads, n)


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_attention_forward_fp32(case, is_global):
    b, h, w, c, heads, wh, ww = case
    qkv, table, gq, scale = make_attention(b, h, w, c, heads, wh, ww, is_global, padded=(b == 3))
    out, lse = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, heads, wh, ww, scale)
    expected = ref.window_attention(qkv, table, heads, (wh, ww), gq, scale)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=ATOL32, rtol=RTOL32)
    torch.testing.assert_close(lse.double(), reference_lse(qkv, table, gq, heads, wh, ww, scale), atol=1e-5, rtol=1e-5)
    # the CPU kernel of the op is the C++ one (bitwise the same as calling the extension directly)
    direct, _ = EXT.window_attention_fwd(qkv, table, gq, heads, wh, ww, scale)
    assert torch.equal(out, direct)


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_attention_inference_adds_the_qkv_bias(case, is_global):
    """window_attention_inference(qkv, b) is window attention of qkv + b, the bias added by the kernel on load."""
    b, h, w, c, heads, wh, ww = case
    qkv, table, gq, scale = make_attention(b, h, w, c, heads, wh, ww, is_global, padded=(b == 3))
    qkv_bias = torch.randn(qkv.shape[-1])
    expected = ref.window_attention(qkv + qkv_bias, table, heads, (wh, ww), gq, scale)
    out = cpu.window_attention_inference(qkv, qkv_bias, table, heads, (wh, ww), gq, scale)
    torch.testing.assert_close(out, expected, atol=ATOL32, rtol=RTOL32)
    out_nobias = cpu.window_attention_inference(qkv, None, table, heads, (wh, ww), gq, scale)
    assert torch.equal(out_nobias, torch.ops.gcvit.window_attention_fwd(qkv, table, gq, heads, wh, ww, scale)[0])
    # other dtypes run the PyTorch math, the bias included
    out64 = cpu.window_attention_inference(qkv.double(), qkv_bias.double(), table.double(), heads, (wh, ww),
                                           None if gq is None else gq.double(), scale)
    torch.testing.assert_close(out64.float(), expected, atol=ATOL32, rtol=RTOL32)
    with pytest.raises(ValueError, match="qkv_bias must be"):
        cpu.window_attention_inference(qkv, qkv_bias[1:], table, heads, (wh, ww), gq, scale)


def test_attention_nan_reaches_the_same_outputs_as_the_reference():
    # a NaN key poisons every query of its window and head, and nothing else (no silent 0 from the exp's clamp)
    qkv, table, _, scale = make_attention(2, 14, 14, 64, 2, 7, 7, False)
    qkv[0, 1, 2, 64 + 3] = float("nan")  # image 0, window (0, 0), key of head 0
    out, lse = torch.ops.gcvit.window_attention_fwd(qkv, table, None, 2, 7, 7, scale)
    expected = ref.window_attention(qkv, table, 2, (7, 7), None, scale)
    assert torch.isnan(expected).any() and torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite], expected[finite], atol=ATOL32, rtol=RTOL32)


def test_attention_global_query_flat_layout():
    qkv, table, gq, scale = make_attention(2, 14, 14, 32, 2, 7, 7, True, gq_flat=True)
    out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, 2, 7, 7, scale)
    torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), gq, scale), atol=ATOL32, rtol=RTOL32)


def test_attention_global_query_fewer_than_images():
    # G divides T but is not B: window w uses query w // (T / G)
    qkv, table, _, scale = make_attention(4, 14, 14, 32, 2, 7, 7, True)
    gq = torch.randn(2, 7, 7, 32)
    out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, 2, 7, 7, scale)
    torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), gq, scale), atol=ATOL32, rtol=RTOL32)


@pytest.mark.parametrize("case", ATTN_CASES[:4], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_attention_forward_bf16(case, is_global):
    b, h, w, c, heads, wh, ww = case
    qkv, table, gq, scale = make_attention(b, h, w, c, heads, wh, ww, is_global, dtype=torch.bfloat16)
    out, lse = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, heads, wh, ww, scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    expected = ref.window_attention(qkv.float(), table.float(), heads, (wh, ww),
                                    None if gq is None else gq.float(), scale)
    torch.testing.assert_close(out.float(), expected, atol=ATOL16, rtol=RTOL16)


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("case", [(2, 14, 14, 32, 2, 7, 7), (3, 10, 9, 20, 4, 5, 3)], ids=["7x7", "5x3"])
def test_attention_grad_fp32(case, is_global):
    b, h, w, c, heads, wh, ww = case
    qkv, table, gq, scale = make_attention(b, h, w, c, heads, wh, ww, is_global)
    leaves = [t.requires_grad_() for t in (qkv, table, gq) if t is not None]
    out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, heads, wh, ww, scale)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    expected = torch.autograd.grad(ref.window_attention(qkv, table, heads, (wh, ww), gq, scale), leaves, g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("is_global", [False, True], ids=["local", "global"])
def test_attention_gradcheck_fp64(is_global):
    # fp64 runs the op's PyTorch-math CPU path (the C++ kernel is fp32/bf16): this checks the backward formula
    qkv, table, gq, scale = make_attention(2, 6, 4, 8, 2, 3, 2, is_global, dtype=torch.float64)
    args = [t.requires_grad_() for t in (qkv, table, gq) if t is not None]

    def f(*a):
        q, t = a[0], a[1]
        g = a[2] if is_global else None
        return torch.ops.gcvit.window_attention_fwd(q, t, g, 2, 3, 2, scale)[0]

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def mbconv_inputs(b, c, h, w, dtype=torch.float32, channels_last=False):
    x = torch.randn(b, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rd = max(1, c // 4)
    ws = (torch.randn(c, 1, 3, 3, dtype=dtype) * 0.5, torch.randn(rd, c, 1, 1, dtype=dtype) * c ** -0.5,
          torch.randn(c, rd, 1, 1, dtype=dtype) * rd ** -0.5, torch.randn(c, c, 1, 1, dtype=dtype) * c ** -0.5)
    return x, ws


# fp32 channels_last with C a whole number of vectors takes the register-blocked 1x1 pass: 64 channels (even
# vector count) and 24 (odd: a one-vector column block), pixel counts not multiples of its 6-row strips or tasks;
# the last four have H W < C (the kernel gates the activations, not the 1x1 weights); a 1x1 map is both layouts;
# one-row and one-column maps take the depthwise rows with neither neighbour row or neither neighbour column
MB_CASES = [(2, 64, 14, 14), (2, 24, 9, 11), (3, 20, 9, 7), (1, 12, 1, 17), (2, 128, 8, 8), (2, 16, 1, 1),
            (1, 32, 1, 5), (2, 32, 6, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: "x".join(map(str, c)))
def test_mbconv_forward_fp32(case, channels_last, gemm_backend):
    x, ws = mbconv_inputs(*case, channels_last=channels_last)
    y = torch.ops.gcvit.fused_mbconv_fwd(x, *ws)
    torch.testing.assert_close(y, ref.fused_mbconv(x, *ws), atol=ATOL32, rtol=RTOL32)
    assert torch.equal(y, EXT.fused_mbconv_fwd(x, *ws))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: "x".join(map(str, c)))
def test_mbconv_forward_bf16(case, channels_last):
    x, ws = mbconv_inputs(*case, dtype=torch.bfloat16, channels_last=channels_last)
    y = torch.ops.gcvit.fused_mbconv_fwd(x, *ws)
    assert y.dtype == torch.bfloat16
    expected = ref.fused_mbconv(x.float(), *(w.float() for w in ws))
    torch.testing.assert_close(y.float(), expected, atol=ATOL16 * 2, rtol=RTOL16)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_mbconv_grad_fp32(channels_last):
    x, ws = mbconv_inputs(3, 20, 9, 7, channels_last=channels_last)
    leaves = [t.requires_grad_() for t in (x, *ws)]
    y = torch.ops.gcvit.fused_mbconv_fwd(*leaves)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    expected = torch.autograd.grad(ref.fused_mbconv(*leaves), leaves, g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_mbconv_gradcheck_fp64():
    x, ws = mbconv_inputs(2, 8, 5, 4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, *ws)]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.gcvit.fused_mbconv_fwd(*a), args, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_thread_count_invariance(dtype):
    qkv, table, gq, scale = make_attention(3, 21, 14, 36, 3, 7, 7, True, dtype=dtype)
    x, ws = mbconv_inputs(3, 24, 9, 7, dtype=dtype)  # 189 pixels: a partial strip, runs across images
    xl = x.to(memory_format=torch.channels_last)
    # fp32 whole vectors of channels: one image with 2 threads runs step by step, with 1 thread as a whole-image
    # task, with the gate in the 1x1 weights (63 pixels) and in t (15 pixels < 32 channels)
    one_image = [mbconv_inputs(1, 32, h, w, dtype=dtype, channels_last=True) for h, w in ((9, 7), (3, 5))]
    results = []
    for n in (1, 2):
        with num_threads(n):
            a = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, 3, 7, 7, scale)
            b = torch.ops.gcvit.window_attention_fwd(torch.cat([qkv, qkv[..., :36]], -1), table, None, 3, 7, 7,
                                                     scale)
            # one window, 3 heads: with 2 threads the heads are split over tasks, with 1 they are not
            c = torch.ops.gcvit.window_attention_fwd(qkv[:1, :7, :7, : 3 * 36], table, None, 3, 7, 7, scale)
            results.append((*a, *b, *c, torch.ops.gcvit.fused_mbconv_fwd(x, *ws),
                            torch.ops.gcvit.fused_mbconv_fwd(xl, *ws),
                            *(torch.ops.gcvit.fused_mbconv_fwd(x1, *ws1) for x1, ws1 in one_image)))
    for r1, r2 in zip(*results):
        assert torch.equal(r1, r2)


def test_attention_bias_cache_follows_the_table_contents():
    """The kernel keeps built biases by the table's contents: a table changed in place (also behind autograd's
    back, through .data) gives the new bias; the cache stays bounded and arena_empty_cache frees it."""
    qkv, table, _, scale = make_attention(2, 14, 7, 32, 2, 7, 7, False)
    for change in (lambda t: t.add_(0.5), lambda t: t.data.mul_(-2.0), lambda t: t.data[3, 1].fill_(9.0)):
        out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, None, 2, 7, 7, scale)
        torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), None, scale))
        change(table)
        out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, None, 2, 7, 7, scale)
        torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), None, scale))
    assert EXT.bias_cache_bytes() > 0
    big_qkv = torch.randn(1, 32, 32, 3 * 4 * 8)
    for i in range(6):  # 4 heads of a 32x32 window: 16 MiB of bias per table, over the 64 MiB bound after four
        EXT.window_attention_fwd(big_qkv, torch.randn(63 * 63, 4), None, 4, 32, 32, 0.3)
        assert (16 << 20) * min(i + 1, 3) <= EXT.bias_cache_bytes() <= 64 << 20
    cpu.arena_empty_cache()
    assert EXT.bias_cache_bytes() == 0


def test_thread_count_invariance_backward():
    qkv, table, gq, scale = make_attention(2, 14, 14, 32, 2, 7, 7, True)
    x, ws = mbconv_inputs(2, 16, 9, 9)
    grads = []
    for n in (1, 2):
        with num_threads(n):
            leaves = [t.detach().requires_grad_() for t in (qkv, table, gq)]
            out, _ = torch.ops.gcvit.window_attention_fwd(leaves[0], leaves[1], leaves[2], 2, 7, 7, scale)
            g1 = torch.autograd.grad(out.square().sum(), leaves)
            mleaves = [t.detach().requires_grad_() for t in (x, *ws)]
            g2 = torch.autograd.grad(torch.ops.gcvit.fused_mbconv_fwd(*mleaves).square().sum(), mleaves)
            grads.append(g1 + g2)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bad_attention_inputs_raise():
    qkv, table, gq, scale = make_attention(2, 14, 14, 32, 2, 7, 7, False)
    op = torch.ops.gcvit.window_attention_fwd
    with pytest.raises(ValueError, match="not divisible by the window"):
        op(qkv[:, :13], table, None, 2, 7, 7, scale)
    with pytest.raises(ValueError, match="rel_pos_bias_table"):
        op(qkv, table[:-1], None, 2, 7, 7, scale)
    with pytest.raises(ValueError, match="S\\*num_heads"):
        op(qkv, table, None, 5, 7, 7, scale)
    with pytest.raises(ValueError, match="global_query"):
        op(qkv[..., :64], table, torch.randn(2, 48, 32), 2, 7, 7, scale)
    with pytest.raises(ValueError, match="stride 1"):
        op(qkv.transpose(1, 3).contiguous().transpose(1, 3), table, None, 2, 7, 7, scale)
    with pytest.raises(TypeError):
        op(qkv.to(torch.int32), table, None, 2, 7, 7, scale)
    # the C++ entry point itself checks too (RuntimeError from TORCH_CHECK, never a crash)
    with pytest.raises(RuntimeError, match="not divisible by window"):
        EXT.window_attention_fwd(qkv[:, :13], table, None, 2, 7, 7, scale)
    with pytest.raises(RuntimeError, match="rel_pos_bias_table"):
        EXT.window_attention_fwd(qkv, table[:3], None, 2, 7, 7, scale)
    with pytest.raises(RuntimeError, match="not divisible by G"):
        EXT.window_attention_fwd(qkv[..., :64], table, torch.randn(3, 49, 32), 2, 7, 7, scale)


def test_bad_mbconv_inputs_raise():
    x, (dw, r, e, p) = mbconv_inputs(2, 16, 8, 8)
    op = torch.ops.gcvit.fused_mbconv_fwd
    with pytest.raises(ValueError, match="dw_weight"):
        op(x, dw[:, :, :2], r, e, p)
    with pytest.raises(ValueError, match="se_expand_weight"):
        op(x, dw, r, e[:, :2], p)
    with pytest.raises(ValueError, match="pw_weight"):
        op(x, dw, r, e, p[:8])
    with pytest.raises(ValueError, match="4-D"):
        op(x[0], dw, r, e, p)
    with pytest.raises(RuntimeError, match="pw_weight"):
        EXT.fused_mbconv_fwd(x, dw, r, e, p[:8])
    with pytest.raises(RuntimeError, match="dtype"):
        EXT.fused_mbconv_fwd(x.double(), dw.double(), r.double(), e.double(), p.double())


def test_fallback_paths_match_reference(monkeypatch):
    """Without the extension (or for dtypes it does not take) the CPU kernels run PyTorch math."""
    qkv, table, gq, scale = make_attention(2, 14, 14, 32, 2, 7, 7, True)
    x, ws = mbconv_inputs(2, 16, 9, 9)
    monkeypatch.setattr(cpu, "_ext", None)
    out, lse = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, 2, 7, 7, scale)
    torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), gq, scale), atol=ATOL32, rtol=RTOL32)
    torch.testing.assert_close(lse.double(), reference_lse(qkv, table, gq, 2, 7, 7, scale), atol=1e-5, rtol=1e-5)
    y = torch.ops.gcvit.fused_mbconv_fwd(x, *ws)
    torch.testing.assert_close(y, ref.fused_mbconv(x, *ws), atol=ATOL32, rtol=RTOL32)
    monkeypatch.undo()
    # fp16 is not a C++ dtype: the op still answers, through the PyTorch math in fp32
    y16 = torch.ops.gcvit.fused_mbconv_fwd(x.half(), *(w.half() for w in ws))
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), ref.fused_mbconv(x.half().float(), *(w.half().float() for w in ws)),
                               atol=1e-2, rtol=1e-2)


def test_build_is_cached():

    d = cpu.build_directory()
    assert os.path.isdir(d) and any(f.endswith(".so") for f in os.listdir(d))
    assert EXT.capability() in ("AVX512", "AVX2", "DEFAULT")
    assert cpu.available()


def test_build_failure_warns_once_and_falls_back(tmp_path):
    """No working compiler: one clear warning, available() is False, the ops still answer (PyTorch math)."""

    code = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from gcvit_kernels import cpu
    assert not cpu.available()
    assert not cpu.available()
    from gcvit import functional as ref
    qkv, table = torch.randn(1, 7, 7, 96), torch.randn(169, 2)
    out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, None, 2, 7, 7, 0.25)
    torch.testing.assert_close(out, ref.window_attention(qkv, table, 2, (7, 7), None, 0.25))
msgs = [str(w.message) for w in caught if "C++ CPU kernels could not be built" in str(w.message)]
assert len(msgs) == 1, msgs
print("OK", cpu.load_error()[:80])
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), GCVIT_EXT_DIR=str(tmp_path / "ext"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def _narrower_variants():
    best = cpu._variant()[0]
    names = [v[0] for v in cpu._VARIANTS]
    return names[: names.index(best)]


@pytest.mark.parametrize("variant", _narrower_variants())
def test_narrower_build_matches_reference(tmp_path, variant):
    """The builds a narrower CPU would pick (the generic one without AVX2; AVX2 on an AVX-512 CPU): each compiles
    and gives correct results."""

    code = """
import torch
from gcvit_kernels import cpu
from gcvit import functional as ref
assert cpu.available(), cpu.load_error()
assert torch.ops.gcvit_cpu.capability() == {"default": "DEFAULT", "avx2": "AVX2"}[%r], torch.ops.gcvit_cpu.capability()
qkv, table, gq = torch.randn(3, 21, 14, 72), torch.randn(169, 3), torch.randn(3, 49, 36)
out, _ = torch.ops.gcvit.window_attention_fwd(qkv, table, gq, 3, 7, 7, 0.3)
torch.testing.assert_close(out, ref.window_attention(qkv, table, 3, (7, 7), gq, 0.3), atol=2e-5, rtol=2e-5)
for cl in (False, True):
    x = torch.randn(3, 20, 9, 7)
    x = x.to(memory_format=torch.channels_last) if cl else x
    ws = (torch.randn(20, 1, 3, 3), torch.randn(5, 20, 1, 1), torch.randn(20, 5, 1, 1), torch.randn(20, 20, 1, 1))
    torch.testing.assert_close(torch.ops.gcvit.fused_mbconv_fwd(x, *ws), ref.fused_mbconv(x, *ws), atol=2e-5, rtol=2e-5)
from test_cpu_kernels import check_gelu
check_gelu(torch.ops.gcvit_cpu)
print("OK")
""" % variant
    env = dict(os.environ, GCVIT_EXT_VARIANT=variant, GCVIT_EXT_DIR=str(tmp_path / "ext"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# the two Linear ops of the GEMM backend, each against its PyTorch expression
LINEAR_OPS = {"linear": (cpu.linear, F.linear), "linear_gelu": (cpu.linear_gelu, lambda *a: F.gelu(F.linear(*a)))}


@pytest.mark.parametrize("op", LINEAR_OPS)
# on oneDNN with AVX-512, weights with N a whole number of vectors take the tiled GEMM: 37 x 64 (a partial strip),
# 130 x 16 (N = 48: panels of 2 and 1 vectors, 130 rows: a partial strip), 53 x 400 (1.9 MB of weights:
# 3 column groups of 6, 7 and 7 panels, the last two with tails) and 2 x 49 x 512 (3 MB: 4 groups of 6 panels); N = 60
# takes oneDNN's
@pytest.mark.parametrize("shape,bias", [((3, 5, 7, 20), True), ((37, 64), False), ((130, 16), True),
                                        ((53, 400), True), ((2, 49, 512), True)],
                         ids=["4d_odd", "2d_nobias", "2d_panel_tails", "2d_column_groups", "3d_c512"])
def test_linear_ops_forward_and_grad(op, shape, bias, gemm_backend):
    fused, reference = LINEAR_OPS[op]
    k = shape[-1]
    n = 3 * k
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(n, k) * k ** -0.5).requires_grad_()
    b = torch.randn(n, requires_grad=True) if bias else None
    y = fused(x, w, b)
    expected = reference(x, w, b)
    torch.testing.assert_close(y, expected, atol=ATOL32, rtol=RTOL32)
    assert torch.equal(y.detach().reshape(-1, n), getattr(EXT, op)(x.detach().reshape(-1, k), w.detach(),
                                                                     None if b is None else b.detach()))
    g = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    for a, e in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(expected, leaves, g)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


# n = 30: never the tiled GEMM, so each backend's own GEMM sees the degenerate shape too
@pytest.mark.parametrize("m,k,n", [(0, 64, 192), (5, 0, 32), (5, 0, 30), (0, 8, 30), (7, 1, 16)],
                         ids=["no_rows", "no_inputs", "no_inputs_untiled", "no_rows_untiled", "one_input"])
def test_linear_ops_degenerate_shapes(m, k, n, gemm_backend):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    with torch.inference_mode():
        for op, (fused, reference) in LINEAR_OPS.items():
            torch.testing.assert_close(fused(x, w, b), reference(x, w, b), atol=ATOL32, rtol=RTOL32)


def test_linear_other_dtypes_and_errors():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(6, 8, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, c: cpu.linear(a, c, b), (x, w), fast_mode=True)
    xb, wb = torch.randn(5, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu.linear(xb, wb), F.linear(xb, wb))
    with pytest.raises(ValueError, match="linear"):
        cpu.linear(torch.randn(4, 8), torch.randn(6, 7))
    with pytest.raises(ValueError, match="bias"):
        cpu.linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_mbconv_large_channels_small_map(channels_last, gemm_backend):
    """C = 512 on a map of H W < C: the gate goes into t and the 1x1 + residual is one GEMM over every image's
    pixels (on oneDNN ours, its output columns in two groups of weights; with 4 threads the threads' runs of rows
    split the groups and cross from one to the next). 1 and 2 images (with 2 threads: step by step, then image by
    image); 1, 2 and 4 threads: the same bits."""
    x, ws = mbconv_inputs(2, 512, 3, 5, channels_last=channels_last)
    with torch.inference_mode():
        results = []
        for n in (1, 2, 4):
            with num_threads(n):
                results.append([torch.ops.gcvit.fused_mbconv_fwd(xb, *ws) for xb in (x[:1], x)])
        expected = ref.fused_mbconv(x, *ws)
        for y1, y in results:
            torch.testing.assert_close(y, expected, atol=ATOL32, rtol=RTOL32)
            torch.testing.assert_close(y1, expected[:1], atol=ATOL32, rtol=RTOL32)
            assert torch.equal(y1, results[0][0]) and torch.equal(y, results[0][1])


def _frozen_calls():
    """(weights, call(weights) -> output, index of a GEMM weight, whether packed on every backend) for each op
    whose GEMM weights frozen_weights keeps: a Linear, the MLP (two weights), the Fused-MBConv with one packed 1x1
    weight for every image (C = 256 on H W < C: our 1x1 pass on every build and backend) and with one GEMM over
    every image (C = 512)."""
    x = torch.randn(53, 256)
    xm = torch.randn(37, 64)
    x256, ws256 = mbconv_inputs(2, 256, 5, 5, channels_last=True)
    x512, ws512 = mbconv_inputs(2, 512, 3, 5, channels_last=True)
    return {
        "linear": ([torch.randn(768, 256) * 0.06, torch.randn(768)], lambda w: EXT.linear(x, *w), 0, False),
        "mlp_fc1": ([torch.randn(256, 64) * 0.1, torch.randn(64, 256) * 0.06],
                    lambda w: EXT.mlp_residual(xm, w[0], None, w[1], None, xm, None), 0, False),
        "mlp_fc2": ([torch.randn(256, 64) * 0.1, torch.randn(64, 256) * 0.06],
                    lambda w: EXT.mlp_residual(xm, w[0], None, w[1], None, xm, None), 1, False),
        "mbconv_c256": (list(ws256), lambda w: EXT.fused_mbconv_fwd(x256, *w), 3, True),
        "mbconv_c512": (list(ws512), lambda w: EXT.fused_mbconv_fwd(x512, *w), 3, False),
    }


def _intel_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read()
    except OSError:
        return False


def _tiled(backend):
    """Where the GEMMs of Linear layers are our tiles: oneDNN on AVX-512 builds; AVX2 builds off Intel CPUs."""
    cap = EXT.capability()
    return (cap == "AVX512" and backend == "onednn") or (cap == "AVX2" and not _intel_cpu())


@pytest.mark.parametrize("name", list(_frozen_calls()))
def test_frozen_weights_reuse_packing_and_follow_changes(name, gemm_backend):
    """Inside frozen_weights the tiled GEMMs keep each weight's packed panels (none kept where the GEMMs are not
    tiled) and give the same bits as outside; a weight changed in place (mul_, copy_) is packed again: the output
    equals a fresh copy's. The outermost exit frees every kept weight."""
    weights, call, i, always = _frozen_calls()[name]
    expected = call(weights)
    with cpu.frozen_weights():
        assert torch.equal(call(weights), expected)
        kept = cpu.frozen_weights_bytes()
        assert (kept > 0) == (always or _tiled(gemm_backend))
        assert torch.equal(call(weights), expected) and cpu.frozen_weights_bytes() == kept
        for change in (lambda w: w.mul_(1.5), lambda w: w.copy_(torch.randn_like(w) * 0.05)):
            with torch.no_grad():
                change(weights[i])
            fresh = call([w.clone() for w in weights])
            assert not torch.equal(fresh, expected)
            assert torch.equal(call(weights), fresh)
    assert cpu.frozen_weights_bytes() == 0


def test_frozen_weights_keep_only_the_callers_tensors():
    """Nothing is kept for weights that are not the caller's own tensors (a non-contiguous weight, copied for the
    call) or that have no version counter (inference tensors); scopes nest, the outermost exit frees."""
    x = torch.randn(20, 64)
    w = torch.randn(128, 64)
    expected = F.linear(x, w)
    with cpu.frozen_weights():
        torch.testing.assert_close(EXT.linear(x, w.t().contiguous().t(), None), expected, atol=ATOL32, rtol=RTOL32)
        with torch.inference_mode():
            w_inference = w.clone()
        torch.testing.assert_close(EXT.linear(x, w_inference, None), expected, atol=ATOL32, rtol=RTOL32)
        assert cpu.frozen_weights_bytes() == 0
        with cpu.frozen_weights():
            EXT.linear(x, w, None)
        assert cpu.frozen_weights_bytes() == (128 * 64 * 4 if _tiled(cpu.gemm_backend()) else 0)
    assert cpu.frozen_weights_bytes() == 0


def test_gemm_backend_default_and_choice():
    if os.environ.get("GCVIT_CPU_GEMM", "") not in ("", "auto"):
        pytest.skip("GCVIT_CPU_GEMM forces the backend in this run")
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    code = "from gcvit_kernels import cpu; print('BACKEND', cpu.gemm_backend())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = {}
    for forced in ("", "blas", "bogus"):
        env = dict(os.environ, GCVIT_CPU_GEMM=forced)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs[forced] = (r.stdout.split("BACKEND")[-1].strip(), r.stderr)
    default = "onednn" if x86 and not intel and EXT.has_onednn() else "blas"
    assert outputs[""][0] == default
    assert outputs["blas"][0] == "blas"
    assert outputs["bogus"][0] == default and "GCVIT_CPU_GEMM='bogus' ignored" in outputs["bogus"][1]
    with pytest.raises(ValueError, match="blas"):
        cpu.set_gemm_backend("mkl")


def test_linear_gelu_other_dtypes_and_errors():
    x, w, b = torch.randn(4, 8, dtype=torch.float64, requires_grad=True), torch.randn(6, 8, dtype=torch.float64), None
    assert torch.autograd.gradcheck(lambda a: cpu.linear_gelu(a, w, b), (x,), fast_mode=True)
    xb = torch.randn(5, 16, dtype=torch.bfloat16)
    wb = torch.randn(8, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu.linear_gelu(xb, wb), F.gelu(F.linear(xb, wb)))
    with pytest.raises(ValueError, match="linear_gelu"):
        cpu.linear_gelu(torch.randn(4, 8), torch.randn(6, 7))
    with pytest.raises(ValueError, match="bias"):
        cpu.linear_gelu(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5))


def _vector(n, present):
    return torch.randn(n) if present else None


@pytest.mark.parametrize("shape,n,bias,gamma", [((3, 5, 7, 20), 20, True, False), ((37, 64), 64, False, True),
                                                ((2, 49, 96), 35, True, True), ((1, 8, 8, 256), 256, True, False)],
                         ids=["4d_odd", "2d_nobias_gamma", "n35_gamma", "c256"])
def test_linear_residual_layernorm_forward(shape, n, bias, gamma, gemm_backend):
    k = shape[-1]
    x, w = torch.randn(*shape), torch.randn(n, k) * k ** -0.5
    b, g = _vector(n, bias), _vector(n, gamma)
    residual = torch.randn(*shape[:-1], n + 5)[..., :n]  # rows with a stride larger than n
    ln_weight, ln_bias = torch.randn(n), _vector(n, bias)
    y_expected = residual + F.linear(x, w, b) * (g if g is not None else 1)
    with torch.inference_mode():
        y, normed = cpu.linear_residual_layernorm(x, w, b, residual, g, ln_weight, ln_bias)
    torch.testing.assert_close(y, y_expected, atol=ATOL32, rtol=RTOL32)
    torch.testing.assert_close(normed, F.layer_norm(y_expected, (n,), ln_weight, ln_bias), atol=ATOL32, rtol=RTOL32)


# the row stride of the strided case is larger than C; the channels-last case is a permuted (B, H, W, C) view
@pytest.mark.parametrize("case", ["4d_odd", "2d_nobias", "c512", "strided_rows", "channels_last_view"])
def test_layer_norm_forward(case):
    if case == "strided_rows":
        x = torch.randn(37, 70)[:, :64]
    elif case == "channels_last_view":
        x = torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    else:
        x = torch.randn(*{"4d_odd": (3, 5, 7, 20), "2d_nobias": (37, 64), "c512": (2, 49, 512)}[case])
    n = x.shape[-1]
    weight, bias = torch.randn(n), (None if case == "2d_nobias" else torch.randn(n))
    with torch.inference_mode():
        y = cpu.layer_norm(x, weight, bias, 1e-5)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, F.layer_norm(x, (n,), weight, bias, 1e-5), atol=ATOL32, rtol=RTOL32)


def _mlp_inputs(shape, hidden, bias=True, gamma=True):
    c = shape[-1]
    return (torch.randn(*shape), torch.randn(hidden, c) * c ** -0.5, _vector(hidden, bias),
            torch.randn(c, hidden) * hidden ** -0.5, _vector(c, bias), torch.randn(*shape), _vector(c, gamma))


def _mlp_expected(x, w1, b1, w2, b2, residual, g):
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return residual + (y * g if g is not None else y)


# C <= 128 runs in L2-sized row blocks (2500 rows: full blocks and a partial one; 256 rows on BLAS, 1024 rows and
# C = 64 only on oneDNN's own GEMMs; on oneDNN's tiled blocks (AVX-512) each thread's share of the rows, split at a
# strip, in blocks of 256), C = 256 as two GEMMs; 1 and 2 threads give the same bits
@pytest.mark.parametrize("shape,hidden,bias,gamma", [((2500, 64), 192, True, False), ((2, 7, 7, 20), 60, False, True),
                                                     ((3, 100, 128), 384, True, True), ((2, 49, 256), 768, True, False)],
                         ids=["c64_blocks", "c20_odd", "c128_blocks", "c256_two_gemms"])
def test_mlp_residual_forward(shape, hidden, bias, gamma, gemm_backend):
    if shape[-1] in (64, 128) and gemm_backend == "blas" and not EXT.has_blas():
        pytest.skip("no Fortran sgemm_ symbol in this torch build: the row-blocked path is off")
    args = _mlp_inputs(shape, hidden, bias, gamma)
    with torch.inference_mode():
        with num_threads(2):
            y = cpu.mlp_residual(*args)
        with num_threads(1):
            assert torch.equal(cpu.mlp_residual(*args), y)
    torch.testing.assert_close(y, _mlp_expected(*args), atol=ATOL32, rtol=RTOL32)


def test_fused_block_ops_thread_count_invariance(gemm_backend):
    x, w1, b1, w2, b2, residual, g = _mlp_inputs((4, 300, 64), 192)
    # the multi-threaded GEMMs of linear and of the larger layers' two-GEMM MLP
    xl, wl1, bl1, wl2, bl2, rl, gl = _mlp_inputs((2, 49, 512), 1536)
    ln = (torch.randn(64), torch.randn(64))
    with torch.inference_mode():
        results = []
        for threads in (1, 2):
            with num_threads(threads):
                results.append((cpu.mlp_residual(x, w1, b1, w2, b2, residual, g),
                                *cpu.linear_residual_layernorm(x, w2[:, :64].contiguous(), b2, residual, g, *ln),
                                cpu.layer_norm(x, *ln), cpu.linear(xl, wl1, bl1),
                                cpu.mlp_residual(xl, wl1, bl1, wl2, bl2, rl, gl)))
    assert all(torch.equal(a, c) for a, c in zip(*results))


def test_fused_block_ops_autograd_and_other_dtypes():
    # a differentiated call runs the PyTorch math: gradients are autograd's, fp64 gradchecks
    args = [t.double().requires_grad_() for t in _mlp_inputs((3, 6, 8), 16)]
    assert torch.autograd.gradcheck(lambda *a: cpu.mlp_residual(*a), args, fast_mode=True)
    x, w, b, residual, g = (torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True),
                            *(torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((8, 8), (8,), (3, 6, 8), (8,))))
    ln = [torch.randn(8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda *a: cpu.linear_residual_layernorm(*a), (x, w, b, residual, g, *ln),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: cpu.layer_norm(*a), (x, *ln), fast_mode=True)
    bf16 = [None if t is None else t.bfloat16() for t in _mlp_inputs((5, 16), 32)]
    with torch.inference_mode():
        torch.testing.assert_close(cpu.mlp_residual(*bf16), _mlp_expected(*bf16))


def test_cpu_only_ops_opcheck():
    """Schemas and fake kernels (what torch.compile traces) of the CPU-only inference ops."""
    x, w1, b1, w2, b2, residual, g = _mlp_inputs((2, 5, 8), 16)
    ln_weight, ln_bias = torch.randn(8), torch.randn(8)
    checks = [(torch.ops.gcvit.linear, (x, w1, b1)), (torch.ops.gcvit.linear, (x, w1, None)),
              (torch.ops.gcvit.linear_gelu, (x, w1, b1)),
              (torch.ops.gcvit.mlp_residual, (x, w1, b1, w2, b2, residual, g)),
              (torch.ops.gcvit.linear_residual_layernorm, (x, w2[:, :8].contiguous(), b2, residual, g, ln_weight,
                                                           ln_bias, 1e-5)),
              (torch.ops.gcvit.layer_norm, (x, ln_weight, ln_bias, 1e-5))]
    for is_global in (False, True):
        qkv, table, gq, scale = make_attention(2, 14, 7, 32, 2, 7, 7, is_global)
        checks.append((torch.ops.gcvit.window_attention_inference,
                       (qkv, torch.randn(qkv.shape[-1]), table, gq, 2, 7, 7, scale)))
    for op, args in checks:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def test_fused_block_ops_bad_inputs_raise():
    x, w1, b1, w2, b2, residual, g = _mlp_inputs((4, 8), 16)
    with pytest.raises(ValueError, match="fc1_weight"):
        cpu.mlp_residual(x, torch.randn(16, 7), b1, w2, b2, residual)
    with pytest.raises(ValueError, match="fc2_weight"):
        cpu.mlp_residual(x, w1, b1, torch.randn(8, 15), b2, residual)
    with pytest.raises(ValueError, match="residual"):
        cpu.mlp_residual(x, w1, b1, w2, b2, torch.randn(4, 5))
    with pytest.raises(ValueError, match="gamma"):
        cpu.mlp_residual(x, w1, b1, w2, b2, residual, torch.randn(5))
    with pytest.raises(ValueError, match="fc1_bias is on meta"):
        cpu.mlp_residual(x, w1, b1.to("meta"), w2, b2, residual)
    with pytest.raises(ValueError, match="ln_weight"):
        cpu.linear_residual_layernorm(x, w2[:, :8], b2, residual, None, torch.randn(3), None)
    with pytest.raises(ValueError, match="weight must be"):
        cpu.layer_norm(x, torch.randn(5))
    with pytest.raises(ValueError, match="non-empty last dim"):
        cpu.layer_norm(torch.randn(4, 0), torch.randn(0))
    with pytest.raises(RuntimeError, match="float32"):  # the C++ ops check too, never crash
        EXT.mlp_residual(x.double(), w1.double(), None, w2.double(), None, residual.double(), None)
    with pytest.raises(RuntimeError, match="float32"):
        EXT.layer_norm(x.double(), torch.randn(8), None, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        EXT.layer_norm(x, torch.randn(5), None, 1e-5)


def test_fma_peak_is_a_roofline_for_the_tiled_gemm():
    """The benchmarks' FMA peak probe counts its FLOPs right: no GEMM computes faster than it (best of 9,
    interleaved, so both see the same phase of the machine), and it is a finite rate."""
    import time

    a, w = torch.randn(1536, 256), torch.randn(256, 256)
    flops = 2 * a.shape[0] * w.shape[0] * w.shape[1]
    with torch.inference_mode():
        torch.ops.gcvit_cpu.linear(a, w, None)
        gemm, peak = [], []
        for _ in range(9):
            t0 = time.perf_counter()
            torch.ops.gcvit_cpu.linear(a, w, None)
            gemm.append(flops / (time.perf_counter() - t0) * 1e-9)
            peak.append(EXT.fma_peak_gflops(flops))
    assert all(0 < p < float("inf") for p in peak)
    assert max(peak) >= 0.9 * max(gemm), (peak, gemm)


def test_fma_peak_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="flops must be positive"):
        EXT.fma_peak_gflops(0)


def check_gelu(ext):
    """The kernels' vector GELU (through linear_gelu with the identity) against float64: the table polynomial of
    the AVX-512 and AVX2 builds within 3e-7 of max(1, |gelu|) and 1e-4 relative where |gelu| > 1e-4 (measured
    9.3e-8 / 2.8e-5 and 9.9e-8 / 1.7e-5; ATen's fp32 GELU 1.0e-6 and 6.7e-3), the generic build's erf formula
    within 3e-7 and 1e-3 (2.1e-7, 5.1e-4); special values as float64's GELU."""
    x = torch.linspace(-12, 12, 2 ** 16).view(-1, 16)
    with torch.inference_mode():
        got = ext.linear_gelu(x, torch.eye(16), None).double()
    want = F.gelu(x.double())
    err = (got - want).abs()
    table = ext.capability() in ("AVX512", "AVX2")
    assert (err / want.abs().clamp_min(1)).max() < 3e-7
    large = want.abs() > 1e-4
    assert (err / want.abs())[large].max() < (1e-4 if table else 1e-3)
    # special values, through the bias (zero input and weights), so no product mixes lanes
    special = torch.tensor([float("nan"), float("-inf"), 20.0, -20.0, 8.0, -8.0, 7.99, -7.99, 1e-30, -1e-30, 0.0, 3e38,
                            -3e38, 0.5, -0.5, 1.0])
    with torch.inference_mode():
        got = ext.linear_gelu(torch.zeros(1, 16), torch.zeros(16, 16), special).flatten()
    want = F.gelu(special.double()).float()
    want[11] = 3e38  # float64's GELU(3e38) is 3e38 (float32's overflows to inf in 0.5 x (1 + erf))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-6, equal_nan=True)
    # GELU(+inf) = +inf (ATen's fp32 GELU gives NaN)
    with torch.inference_mode():
        inf = ext.linear_gelu(torch.zeros(1, 16), torch.zeros(16, 16), torch.full((16,), float("inf"))).flatten()
    assert torch.isinf(inf).all() and (inf > 0).all()


def test_gelu_accuracy_and_special_values():
    check_gelu(EXT)
