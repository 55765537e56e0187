"""Fused-MBConv block of GC ViT in Triton: forward and backward.

Math (the reference is ``gcvit.functional.fused_mbconv``; no norm, no bias)::

    d = dwconv3x3(x)                      depthwise, zero padding 1, dw_weight (C, 1, 3, 3)
    t = gelu(d)                           exact erf form
    s = mean_hw(t)                        (B, C)
    g = sigmoid(W2 gelu(W1 s))            W1 = se_reduce_weight (C_rd, C), W2 = se_expand_weight (C, C_rd)
    y = x + W_pw (g * t)                  per image: (C, C) @ (C, H*W), W_pw = pw_weight (C, C)

Layouts: ``x`` is (B, C, H, W), NCHW-contiguous or channels_last. Every kernel addresses ``x``,
``grad_out`` and its own (B, C, H, W) buffers through their four strides, so both memory formats
run without a copy; outputs and buffers are allocated with ``empty_like(x)``, which for these two
dense layouts has exactly ``x``'s strides (the kernels rely on that), so results come back in
``x``'s memory format. Other layouts of ``x`` are reported by ``unsupported_reason``; ``grad_out``
may have any strides. Weights are made contiguous (they are
tiny). Inputs may be fp16/bf16/fp32 (fp32 accumulation) or fp64 (fp64 accumulation, used by the
gradcheck tests). ``tl.dot`` runs with ``input_precision="ieee"`` so fp32 means fp32, not TF32.

Forward, two passes over ``x``:

1. ``_dwconv_gelu_pool_kernel``: depthwise conv + GELU on a (channel, pixel) tile, summed over the
   tile's pixels into a partial-sum buffer (B, pixel tiles, C). The buffer is reduced on the host in
   a fixed order, so the pool is deterministic (no atomics). ``t`` itself is not written.
2. The SE MLP runs as torch ops on the (B, C) pooled tensor (a few hundred FLOPs per image; a kernel
   launch would cost more than it saves). ``_pw_conv_kernel`` then computes
   ``y[b] = x[b] + W_pw @ (g[b] * t[b])`` as a batched GEMM whose B operand is rebuilt tile by tile
   from ``x``: depthwise conv + GELU + gate in registers, cast to the input dtype, fed to ``tl.dot``;
   the residual is added in the epilogue.

Recompute ``t`` or read it back? With recompute the forward moves 3 full tensors (pass 1 reads x,
pass 2 reads x and writes y); writing ``t`` in pass 1 and reading it in pass 2 makes that 5, and the
stem and downsampler blocks this op serves are memory-bound. Recomputing costs 9 loads (mostly
L1/L2 hits) and an erf per element per output-channel tile, i.e. C / BLOCK_M times; the 128-row
GEMM config used for C >= 256 halves that for the wide, compute-heavier blocks. Recompute is what is
kept here. This choice is reasoned, not measured: the module was written on a machine without a GPU
(``benchmarks/test_bench_mbconv.py`` measures achieved bandwidth and the ratios to the reference).

Tiles (``DWCONV_CONFIG``, ``GEMM_CONFIGS``) were picked so that every kernel compiles for sm_80 and
sm_90 without register spills (``tests/test_mbconv.py`` checks it ahead of time); the 3x3 taps run
as a runtime loop over kernel rows because a fully unrolled loop let the compiler hoist all nine tile
loads and spill.

Backward (``fused_mbconv_bwd`` gets only ``grad_out`` and the forward inputs, and recomputes):

1. pass 1 again -> s, and the SE MLP in torch -> gate g (and its pre-activations).
2. ``_pw_conv_grad_input_kernel``: ``gu[b] = W_pw^T @ grad_out[b]`` (stored, fp32) and, in its
   epilogue, partial sums of ``gu * t`` (t recomputed) -> dL/dg per (b, c).
3. ``_pw_conv_grad_weight_kernel``: ``grad_pw = sum_b grad_out[b] @ (g t)[b]^T``, a GEMM over
   K = B*H*W, split into a shape-only number of fixed K ranges written to a partial buffer
   (split, C, C) and summed on the host -> deterministic.
4. SE backward in torch on (B, C) tensors -> grad_se_reduce, grad_se_expand, dL/ds.
5. ``_dwconv_grad_kernel``: ``gd = (gu * g + dL/ds / HW) * gelu'(d)`` with d recomputed, stored
   (fp32), and per-tile partial sums of ``gd * x(shifted)`` for the 9 taps -> grad_dw (fixed-order
   host reduction, deterministic). That buffer holds B * HW/32 * C * 9 fp32 values, ~58 MB for the
   stem block (C 64 at 112x112) at batch 64; accumulating several pixel tiles per program would
   shrink it (not done).
6. ``_dwconv_transpose_residual_kernel``: ``grad_x = grad_out + dwconv3x3(gd, flipped dw_weight)``
   (the transpose of a stride-1 padding-1 depthwise conv is the same conv with the kernel flipped).

``d`` and ``t`` are never stored: they cost 9 FMAs and an erf to rebuild from ``x``, against a
full-tensor write and read each. ``gu`` and ``gd`` are stored because they are needed after a global
reduction (dL/dg, dL/ds) or at neighbouring pixels, and rebuilding them would mean redoing the GEMM.

Public API: ``fused_mbconv`` (autograd-aware, through the custom ops ``gcvit::fused_mbconv_fwd``
and ``gcvit::fused_mbconv_bwd``; this module registers their "cuda" kernels and fake kernels, the
CPU kernels come from ``gcvit_kernels.cpu``), ``fused_mbconv_triton`` (the same Triton launches
without the op registry; runs on CPU tensors under ``TRITON_INTERPRET=1``) and
``unsupported_reason``. Double backward is not supported.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_tap(src_ptr, row_offs, row_ok, w, W, stride_w, DW: tl.constexpr):
    """src at column w + DW of the row whose offsets (``row_offs``) and in-image mask (``row_ok``) the
    caller computed; zero outside the image (the conv's padding). Only the border the column can
    cross is tested."""
    inside = row_ok
    if DW == -1:
        inside = inside & (w > 0)
    if DW == 1:
        inside = inside & (w < W - 1)
    return tl.load(src_ptr + row_offs + DW * stride_w, mask=inside, other=0.0)


@triton.jit
def _dwconv3x3(src_ptr, w_ptr, center, c, h, w, valid, C, H, W, stride_h, stride_w, ACC: tl.constexpr):
    """Depthwise 3x3 conv on a tile; ``center`` (offset of (image, channel, h, w)), ``c``, ``h``, ``w``
    and ``valid`` broadcast to the tile's shape, so the same helper serves (channel, pixel) and
    (pixel, channel) tiles. ``w_ptr`` is a contiguous (C, 9) weight.

    A runtime loop over the kernel rows, static over its 3 columns: fully unrolled, the compiler
    hoists all nine tile loads and ptxas spills (seen on sm_90 for 32x64 tiles)."""
    w_row = w_ptr + c * 9
    c_valid = c < C
    acc = tl.where(valid, 0.0, 0.0).to(ACC)
    for dh in range(-1, 2):
        row_ok = valid & (h + dh >= 0) & (h + dh < H)
        row_offs = center + dh * stride_h
        for dw in tl.static_range(-1, 2):
            weight = tl.load(w_row + (dh * 3 + dw + 4), mask=c_valid, other=0.0).to(ACC)
            acc += weight * _load_tap(src_ptr, row_offs, row_ok, w, W, stride_w, dw).to(ACC)
    return acc


@triton.jit
def _gelu(d):
    return 0.5 * d * (1.0 + tl.math.erf(d * 0.7071067811865476))


@triton.jit
def _gelu_grad(d):
    return 0.5 * (1.0 + tl.math.erf(d * 0.7071067811865476)) + d * 0.3989422804014327 * tl.exp(-0.5 * d * d)


@triton.jit
def _channel_pixel_tile(C, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's (BLOCK_C channels x BLOCK_P pixels) tile of image b on the grid (pixel tiles, channel
    tiles, B): b, channels, pixel rows and columns, the in-bounds mask and the offsets in x's strides."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // W
    w = p % W
    valid = (c[:, None] < C) & (p[None, :] < H * W)
    x_offs = b * stride_xb + c[:, None] * stride_xc + (h * stride_xh + w * stride_xw)[None, :]
    return b, c, h, w, valid, x_offs


@triton.jit
def _dwconv_gelu_pool_kernel(
    x_ptr, dw_ptr, partial_ptr,
    C, H, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """partial[b, pixel tile, c] = sum over the tile's pixels of gelu(dwconv3x3(x))[b, c]."""
    b, c, h, w, valid, x_offs = _channel_pixel_tile(C, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                                                    BLOCK_C, BLOCK_P)
    d = _dwconv3x3(x_ptr, dw_ptr, x_offs, c[:, None], h[None, :], w[None, :], valid, C, H, W, stride_xh, stride_xw, ACC)
    # outside the tile d is exactly 0 (every load masked) and gelu(0) = 0, so the sum needs no mask
    t_sum = tl.sum(_gelu(d), axis=1)
    tl.store(partial_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * C + c, t_sum, mask=c < C)


@triton.jit
def _pw_conv_kernel(
    x_ptr, dw_ptr, gate_ptr, pw_ptr, y_ptr,
    C, H, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, o, p] = x[b, o, p] + sum_c W_pw[o, c] * gate[b, c] * gelu(dwconv3x3(x))[b, c, p].

    The GEMM's B operand (gated t) is rebuilt from x per K chunk instead of being read from memory."""
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // W
    w = p % W
    p_valid = p < H * W
    pix_offs = b * stride_xb + (h * stride_xh + w * stride_xw)[None, :]
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        weight = tl.load(pw_ptr + o[:, None] * C + c[None, :], mask=(o[:, None] < C) & (c[None, :] < C), other=0.0)
        valid = (c[:, None] < C) & p_valid[None, :]
        d = _dwconv3x3(x_ptr, dw_ptr, pix_offs + c[:, None] * stride_xc, c[:, None], h[None, :], w[None, :],
                       valid, C, H, W, stride_xh, stride_xw, ACC)
        gate = tl.load(gate_ptr + b * C + c, mask=c < C, other=0.0)
        u = (_gelu(d) * gate[:, None]).to(weight.dtype)
        acc = tl.dot(weight, u, acc, input_precision="ieee", out_dtype=ACC)
    out_offs = pix_offs + o[:, None] * stride_xc
    out_mask = (o[:, None] < C) & p_valid[None, :]
    residual = tl.load(x_ptr + out_offs, mask=out_mask, other=0.0).to(ACC)
    tl.store(y_ptr + out_offs, (acc + residual).to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _pw_conv_grad_input_kernel(
    grad_out_ptr, pw_ptr, x_ptr, dw_ptr, grad_u_ptr, partial_ptr,
    C, H, W,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_u[b] = W_pw^T @ grad_out[b] (grad_u in x's strides) and
    partial[b, pixel tile, c] = sum over the tile's pixels of grad_u * gelu(dwconv3x3(x))."""
    b, c, h, w, valid, x_offs = _channel_pixel_tile(C, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                                                    BLOCK_C, BLOCK_P)
    p_valid = h < H  # pixel index < H * W
    grad_out_pix = b * stride_gb + (h * stride_gh + w * stride_gw)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        o = k0 + tl.arange(0, BLOCK_K)
        weight_t = tl.load(pw_ptr + o[None, :] * C + c[:, None], mask=(o[None, :] < C) & (c[:, None] < C), other=0.0)
        grad_out = tl.load(grad_out_ptr + grad_out_pix + o[:, None] * stride_gc,
                           mask=(o[:, None] < C) & p_valid[None, :], other=0.0)
        acc = tl.dot(weight_t, grad_out, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(grad_u_ptr + x_offs, acc, mask=valid)
    d = _dwconv3x3(x_ptr, dw_ptr, x_offs, c[:, None], h[None, :], w[None, :], valid, C, H, W, stride_xh, stride_xw, ACC)
    # acc is 0 outside the tile (masked operands), so the product needs no mask
    tl.store(partial_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * C + c, tl.sum(acc * _gelu(d), axis=1),
             mask=c < C)


@triton.jit
def _pw_conv_grad_weight_kernel(
    grad_out_ptr, x_ptr, dw_ptr, gate_ptr, partial_ptr,
    C, H, W, K, K_PER_SPLIT,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[split, o, c] = sum over the split's K range of grad_out[b, o, p] * gate[b, c] * t[b, c, p],
    with k = b * H*W + p flattened over images and pixels, t = gelu(dwconv3x3(x)) rebuilt per chunk."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    num_pixels = H * W
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=ACC)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
        k_valid = k < K
        b = k // num_pixels
        p = k % num_pixels
        h = p // W
        w = p % W
        grad_out = tl.load(grad_out_ptr + (b * stride_gb + h * stride_gh + w * stride_gw)[None, :] + o[:, None] * stride_gc,
                           mask=(o[:, None] < C) & k_valid[None, :], other=0.0)
        valid = k_valid[:, None] & (c[None, :] < C)
        x_offs = (b * stride_xb + h * stride_xh + w * stride_xw)[:, None] + c[None, :] * stride_xc
        d = _dwconv3x3(x_ptr, dw_ptr, x_offs, c[None, :], h[:, None], w[:, None], valid, C, H, W,
                       stride_xh, stride_xw, ACC)
        gate = tl.load(gate_ptr + b[:, None] * C + c[None, :], mask=valid, other=0.0)
        u = (_gelu(d) * gate).to(grad_out.dtype)
        acc = tl.dot(grad_out, u, acc, input_precision="ieee", out_dtype=ACC)
    mask = (o[:, None] < C) & (c[None, :] < C)
    tl.store(partial_ptr + split * C * C + o[:, None] * C + c[None, :], acc, mask=mask)


@triton.jit
def _dwconv_grad_kernel(
    x_ptr, dw_ptr, grad_u_ptr, gate_ptr, grad_pool_ptr, grad_d_ptr, partial_ptr,
    C, H, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_d = (grad_u * gate + grad_pool) * gelu'(dwconv3x3(x)), stored in x's strides, and
    partial[b * pixel tiles + tile, c, tap] = sum over the tile of grad_d * x shifted by the tap.
    ``grad_pool`` is dL/ds already divided by H*W (the mean's gradient, broadcast over pixels)."""
    b, c, h, w, valid, x_offs = _channel_pixel_tile(C, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                                                    BLOCK_C, BLOCK_P)
    c_valid = c < C
    d = _dwconv3x3(x_ptr, dw_ptr, x_offs, c[:, None], h[None, :], w[None, :], valid, C, H, W, stride_xh, stride_xw, ACC)
    grad_u = tl.load(grad_u_ptr + x_offs, mask=valid, other=0.0)
    gate = tl.load(gate_ptr + b * C + c, mask=c_valid, other=0.0)
    grad_pool = tl.load(grad_pool_ptr + b * C + c, mask=c_valid, other=0.0)
    # grad_pool reaches every pixel, so positions outside the tile must be zeroed explicitly
    grad_d = tl.where(valid, (grad_u * gate[:, None] + grad_pool[:, None]) * _gelu_grad(d), 0.0)
    tl.store(grad_d_ptr + x_offs, grad_d, mask=valid)
    partial_row = (b * tl.num_programs(0) + tl.program_id(0)) * C + c
    for dh in range(-1, 2):
        row_ok = valid & (h[None, :] + dh >= 0) & (h[None, :] + dh < H)
        row_offs = x_offs + dh * stride_xh
        for dw in tl.static_range(-1, 2):
            shifted = _load_tap(x_ptr, row_offs, row_ok, w[None, :], W, stride_xw, dw).to(ACC)
            tl.store(partial_ptr + partial_row * 9 + (dh * 3 + dw + 4), tl.sum(grad_d * shifted, axis=1), mask=c_valid)


@triton.jit
def _dwconv_transpose_residual_kernel(
    grad_d_ptr, flipped_dw_ptr, grad_out_ptr, grad_x_ptr,
    C, H, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_x = grad_out + dwconv3x3(grad_d, flipped dw_weight); grad_d and grad_x in x's strides."""
    b, c, h, w, valid, x_offs = _channel_pixel_tile(C, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                                                    BLOCK_C, BLOCK_P)
    acc = _dwconv3x3(grad_d_ptr, flipped_dw_ptr, x_offs, c[:, None], h[None, :], w[None, :], valid, C, H, W,
                     stride_xh, stride_xw, ACC)
    grad_out_offs = b * stride_gb + c[:, None] * stride_gc + (h * stride_gh + w * stride_gw)[None, :]
    grad_out = tl.load(grad_out_ptr + grad_out_offs, mask=valid, other=0.0).to(ACC)
    tl.store(grad_x_ptr + x_offs, (acc + grad_out).to(grad_x_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------------
# Launch configuration and wrappers
# --------------------------------------------------------------------------------------------------

# (channel, pixel) tiles of the elementwise-style kernels (pool, dwconv grad, dwconv transpose):
# 4 elements per thread per tap, ~64 registers. Larger per-thread shares spilled on sm_80/sm_90
# (32x64 with 4 or 8 warps, 32x32 with 4 warps for fp16 in the dwconv grad kernel); 32 channels by
# 32 pixels keeps whole rows for both NCHW (pixels contiguous) and channels_last (channels contiguous).
DWCONV_CONFIG = dict(BLOCK_C=32, BLOCK_P=32, num_warps=8, num_stages=2)
# GEMM tiles (BLOCK_M: output rows of the GEMM, BLOCK_N: pixels). The taller tile for C >= 256
# halves how often t is rebuilt per element (C / BLOCK_M times). BLOCK_K = 16, 8 warps and
# num_stages = 1 because the rebuilt operand and the epilogue's depthwise conv are what fill the
# registers: 64x64 tiles with 4 warps, BLOCK_K = 32 or software pipelining made ptxas spill on sm_90
# (the AOT test checks every config for sm_80 and sm_90). Not tuned on a GPU.
GEMM_CONFIGS = (
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=1),
)
# Target program count of the split-K weight-gradient GEMM. A constant (not the device's SM count)
# so the split, and hence the summation order, depends on the shapes alone.
_GRAD_WEIGHT_TARGET_PROGRAMS = 512

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gemm_config(channels: int) -> dict:
    """The GEMM tile config used for ``channels`` channels."""
    return GEMM_CONFIGS[1] if channels >= 256 else GEMM_CONFIGS[0]


def grad_weight_splits(channels: int, k_total: int, block_m: int, block_n: int, block_k: int) -> int:
    """Number of K ranges of the pw weight-gradient GEMM (a function of the shapes only)."""
    tiles = triton.cdiv(channels, block_m) * triton.cdiv(channels, block_n)
    return max(1, min(triton.cdiv(k_total, block_k), triton.cdiv(_GRAD_WEIGHT_TARGET_PROGRAMS, tiles)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(x: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be x's
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _input_problem(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
    """(exception type, message) for inputs the Triton kernels cannot run, else None. No device checks."""
    named = (("x", x), ("dw_weight", dw_weight), ("se_reduce_weight", se_reduce_weight),
             ("se_expand_weight", se_expand_weight), ("pw_weight", pw_weight))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.dtype not in _SUPPORTED_DTYPES:
        return TypeError, f"x must be float16, bfloat16, float32 or float64, got {x.dtype}"
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            return TypeError, f"{name} must have x's dtype {x.dtype}, got {t.dtype}"
    if x.dim() != 4:
        return ValueError, f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return ValueError, f"x must be NCHW-contiguous or channels_last, got strides {x.stride()}"
    b, c, h, w = x.shape
    if min(b, c, h, w) < 1:
        return ValueError, f"x must have no empty dimension, got shape {tuple(x.shape)}"
    if tuple(dw_weight.shape) != (c, 1, 3, 3):
        return ValueError, f"dw_weight must have shape ({c}, 1, 3, 3), got {tuple(dw_weight.shape)}"
    if se_reduce_weight.dim() != 4 or se_reduce_weight.shape[1:] != (c, 1, 1) or se_reduce_weight.shape[0] < 1:
        return ValueError, f"se_reduce_weight must have shape (C_rd, {c}, 1, 1), got {tuple(se_reduce_weight.shape)}"
    c_rd = se_reduce_weight.shape[0]
    if tuple(se_expand_weight.shape) != (c, c_rd, 1, 1):
        return ValueError, f"se_expand_weight must have shape ({c}, {c_rd}, 1, 1), got {tuple(se_expand_weight.shape)}"
    if tuple(pw_weight.shape) != (c, c, 1, 1):
        return ValueError, f"pw_weight must have shape ({c}, {c}, 1, 1), got {tuple(pw_weight.shape)}"
    # per-image offsets are 32-bit in the kernels (the batch offset is 64-bit)
    if max(abs(s) for s in x.stride()[1:]) * max(c, h, w) >= 2**31 or c * c >= 2**31:
        return ValueError, f"one image of x is too large for 32-bit offsets: shape {tuple(x.shape)}"
    return None


def unsupported_reason(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> Optional[str]:
    """None when the Triton kernels support these inputs (shapes and dtypes, not device), else why not."""
    problem = _input_problem(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
    return None if problem is None else problem[1]


def _validate(*tensors: torch.Tensor, grad_out: Optional[torch.Tensor] = None) -> None:
    problem = _input_problem(*tensors)
    if problem is not None:
        raise problem[0](problem[1])
    x = tensors[0]
    names = ("dw_weight", "se_reduce_weight", "se_expand_weight", "pw_weight")
    for name, t in zip(names, tensors[1:]):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    if grad_out is not None:
        if not isinstance(grad_out, torch.Tensor):
            raise TypeError(f"grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
        if grad_out.shape != x.shape:
            raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
        if grad_out.dtype != x.dtype:
            raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
        if grad_out.device != x.device:
            raise ValueError(f"grad_out is on {grad_out.device} but x is on {x.device}")


def _pooled_mean(x: torch.Tensor, dw9: torch.Tensor) -> torch.Tensor:
    """Pass 1: mean over pixels of gelu(dwconv3x3(x)), (B, C) in the accumulation dtype."""
    b, c, h, w = x.shape
    cfg = DWCONV_CONFIG
    grid = (triton.cdiv(h * w, cfg["BLOCK_P"]), triton.cdiv(c, cfg["BLOCK_C"]), b)
    partial = torch.empty((b, grid[0], c), device=x.device, dtype=_acc_dtype(x.dtype))
    _dwconv_gelu_pool_kernel[grid](
        x, dw9, partial, c, h, w, *x.stride(), ACC=_tl_acc(x.dtype),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return partial.sum(1) / (h * w)


def _se_gate(pooled, se_reduce_weight, se_expand_weight):
    """SE MLP on (B, C): returns the gate and the reduce layer's pre-activation (for the backward)."""
    w1 = se_reduce_weight.flatten(1).to(pooled.dtype)
    w2 = se_expand_weight.flatten(1).to(pooled.dtype)
    hidden_pre = pooled @ w1.t()
    gate = torch.sigmoid(F.gelu(hidden_pre) @ w2.t())
    return gate.contiguous(), hidden_pre


def _forward(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> torch.Tensor:
    """Launch wrapper of the forward: validates, then pass 1, SE in torch, pass 2."""
    _validate(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
    b, c, h, w = x.shape
    dw9 = dw_weight.reshape(c, 9).contiguous()
    pw = pw_weight.reshape(c, c).contiguous()
    with _device_guard(x):
        gate, _ = _se_gate(_pooled_mean(x, dw9), se_reduce_weight, se_expand_weight)
        y = torch.empty_like(x)
        cfg = gemm_config(c)
        grid = (triton.cdiv(h * w, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_M"]), b)
        _pw_conv_kernel[grid](
            x, dw9, gate, pw, y, c, h, w, *x.stride(), ACC=_tl_acc(x.dtype),
            BLOCK_O=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def _backward(grad_out, x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> Tuple[torch.Tensor, ...]:
    """Launch wrapper of the backward: (grad_x, grad_dw, grad_se_reduce, grad_se_expand, grad_pw)."""
    _validate(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight, grad_out=grad_out)
    b, c, h, w = x.shape
    acc_dtype = _acc_dtype(x.dtype)
    acc_tl = _tl_acc(x.dtype)
    dw9 = dw_weight.reshape(c, 9).contiguous()
    pw = pw_weight.reshape(c, c).contiguous()
    dwc, gemm = DWCONV_CONFIG, gemm_config(c)
    with _device_guard(x):
        # 1. recompute the pool and the SE gate
        pooled = _pooled_mean(x, dw9)
        gate, hidden_pre = _se_gate(pooled, se_reduce_weight, se_expand_weight)

        # 2. grad_u = W_pw^T grad_out and the per-(b, c) sums of grad_u * t (= dL/dgate)
        grad_u = torch.empty_like(x, dtype=acc_dtype)
        grid = (triton.cdiv(h * w, gemm["BLOCK_N"]), triton.cdiv(c, gemm["BLOCK_M"]), b)
        partial = torch.empty((b, grid[0], c), device=x.device, dtype=acc_dtype)
        _pw_conv_grad_input_kernel[grid](
            grad_out, pw, x, dw9, grad_u, partial, c, h, w, *grad_out.stride(), *x.stride(), ACC=acc_tl,
            BLOCK_C=gemm["BLOCK_M"], BLOCK_P=gemm["BLOCK_N"], BLOCK_K=gemm["BLOCK_K"],
            num_warps=gemm["num_warps"], num_stages=gemm["num_stages"])
        grad_gate = partial.sum(1)

        # 3. grad_pw = sum over images and pixels of grad_out (gate t)^T, split-K with a fixed split
        k_total = b * h * w
        splits = grad_weight_splits(c, k_total, gemm["BLOCK_M"], gemm["BLOCK_M"], gemm["BLOCK_K"])
        k_per_split = triton.cdiv(triton.cdiv(k_total, splits), gemm["BLOCK_K"]) * gemm["BLOCK_K"]
        splits = triton.cdiv(k_total, k_per_split)
        partial = torch.empty((splits, c, c), device=x.device, dtype=acc_dtype)
        grid = (triton.cdiv(c, gemm["BLOCK_M"]), triton.cdiv(c, gemm["BLOCK_M"]), splits)
        _pw_conv_grad_weight_kernel[grid](
            grad_out, x, dw9, gate, partial, c, h, w, k_total, k_per_split, *grad_out.stride(), *x.stride(),
            ACC=acc_tl, BLOCK_O=gemm["BLOCK_M"], BLOCK_C=gemm["BLOCK_M"], BLOCK_K=gemm["BLOCK_K"],
            num_warps=gemm["num_warps"], num_stages=gemm["num_stages"])
        grad_pw = partial.sum(0)

        # 4. SE backward on (B, C): gate = sigmoid(W2 gelu(W1 pooled))
        w1 = se_reduce_weight.flatten(1).to(acc_dtype)
        w2 = se_expand_weight.flatten(1).to(acc_dtype)
        hidden = F.gelu(hidden_pre)
        grad_logit = grad_gate * gate * (1.0 - gate)
        grad_w2 = grad_logit.t() @ hidden
        cdf = 0.5 * (1.0 + torch.erf(hidden_pre * _SQRT1_2))
        grad_hidden_pre = (grad_logit @ w2) * (cdf + hidden_pre * _INV_SQRT_2PI * torch.exp(-0.5 * hidden_pre ** 2))
        grad_w1 = grad_hidden_pre.t() @ pooled
        grad_pool = ((grad_hidden_pre @ w1) / (h * w)).contiguous()

        # 5. grad_d (stored) and grad_dw partial sums
        grad_d = torch.empty_like(x, dtype=acc_dtype)
        grid = (triton.cdiv(h * w, dwc["BLOCK_P"]), triton.cdiv(c, dwc["BLOCK_C"]), b)
        partial = torch.empty((b * grid[0], c, 9), device=x.device, dtype=acc_dtype)
        _dwconv_grad_kernel[grid](
            x, dw9, grad_u, gate, grad_pool, grad_d, partial, c, h, w, *x.stride(), ACC=acc_tl,
            BLOCK_C=dwc["BLOCK_C"], BLOCK_P=dwc["BLOCK_P"], num_warps=dwc["num_warps"], num_stages=dwc["num_stages"])
        grad_dw = partial.sum(0)

        # 6. grad_x = grad_out + dwconv3x3(grad_d, flipped kernel)
        grad_x = torch.empty_like(x)
        flipped_dw9 = dw9.flip(1).contiguous()
        _dwconv_transpose_residual_kernel[grid](
            grad_d, flipped_dw9, grad_out, grad_x, c, h, w, *grad_d.stride(), *grad_out.stride(), ACC=acc_tl,
            BLOCK_C=dwc["BLOCK_C"], BLOCK_P=dwc["BLOCK_P"], num_warps=dwc["num_warps"], num_stages=dwc["num_stages"])
    return (
        grad_x,
        grad_dw.reshape(dw_weight.shape).to(dw_weight.dtype),
        grad_w1.reshape(se_reduce_weight.shape).to(se_reduce_weight.dtype),
        grad_w2.reshape(se_expand_weight.shape).to(se_expand_weight.dtype),
        grad_pw.reshape(pw_weight.shape).to(pw_weight.dtype),
    )


# --------------------------------------------------------------------------------------------------
# Autograd (direct Triton path) and custom ops
# --------------------------------------------------------------------------------------------------


class _FusedMBConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
        ctx.save_for_backward(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
        return _forward(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(grad_out, *ctx.saved_tensors)


def fused_mbconv_triton(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> torch.Tensor:
    """Fused-MBConv through the Triton launches directly (no op registry); autograd-aware."""
    return _FusedMBConvTriton.apply(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)


@torch.library.custom_op("gcvit::fused_mbconv_fwd", mutates_args=(), device_types="cuda")
def _fused_mbconv_fwd_op(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    se_reduce_weight: torch.Tensor,
    se_expand_weight: torch.Tensor,
    pw_weight: torch.Tensor,
) -> torch.Tensor:
    return _forward(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)


@_fused_mbconv_fwd_op.register_fake
def _fused_mbconv_fwd_fake(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
    return torch.empty_like(x)


@torch.library.custom_op("gcvit::fused_mbconv_bwd", mutates_args=(), device_types="cuda")
def _fused_mbconv_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    se_reduce_weight: torch.Tensor,
    se_expand_weight: torch.Tensor,
    pw_weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)


@_fused_mbconv_bwd_op.register_fake
def _fused_mbconv_bwd_fake(grad_out, x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
    return (torch.empty_like(x), torch.empty_like(dw_weight), torch.empty_like(se_reduce_weight),
            torch.empty_like(se_expand_weight), torch.empty_like(pw_weight))


def _fwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fwd_backward(ctx, grad_out):
    return torch.ops.gcvit.fused_mbconv_bwd(grad_out, *ctx.saved_tensors)


_fused_mbconv_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def fused_mbconv(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> torch.Tensor:
    """y = x + conv1x1(se(gelu(dwconv3x3(x)))) through ``gcvit::fused_mbconv_fwd`` (autograd-aware).

    Raises TypeError/ValueError for invalid inputs before anything is launched."""
    _validate(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
    return torch.ops.gcvit.fused_mbconv_fwd(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
