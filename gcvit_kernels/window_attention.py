"""Triton window attention for GC ViT (local and global-query), with a learned relative-position bias.

Math, per window of N = wh * ww tokens and per head::

    out = softmax(scale * q k^T + B) v,   B[i, j] = rel_pos_bias_table[idx(i, j), head]
    idx(i, j) = (yi - yj + wh - 1) * (2 ww - 1) + (xi - xj + ww - 1),   token t at (y, x) = (t // ww, t % ww)

The reference is ``gcvit.functional.window_attention``.

Layouts (a fixed contract; the model and the CPU kernels of the same ops depend on it):

* ``qkv``: (B, H, W, S * C), last dim stride 1, other strides arbitrary; the qkv projection of the
  un-partitioned map, channels (S, heads, head_dim), S = 3 local (q, k, v) or S = 2 global (k, v).
  Window w of T = B * (H / wh) * (W / ww) is (b, wy, wx), image-major then row-major.
* ``global_query``: None or (G, wh, ww, C) / (G, N, C), channels (heads, head_dim); window w uses global
  query w // (T / G). It is read once per program and never repeated in memory.
* ``rel_pos_bias_table``: ((2 wh - 1) * (2 ww - 1), heads).
* out: (B, H, W, C) contiguous, same dtype as qkv; lse: (T, heads, N) float32 natural-log logsumexp.

What is fused: window partition / reverse (index arithmetic on the map; no copies), the relative-position
bias (its index computed in the kernel; no index tensor, no (heads, N, N) bias in memory), the global query
broadcast, scaling, softmax (online, flash style, in exp2) and both matmuls. Accumulation is fp32 for
fp16 / bf16 / fp32 inputs (fp32 dots use 3xTF32 on tensor cores, which keeps fp32 accuracy); fp64 inputs,
used only for gradcheck under the interpreter, accumulate in fp64. There is no fp32 backward at head_dim 128
(no tile compiles without spilling; see ``_BACKWARD_DKDV_TILES``).

Tiling: one program per (window, head, block of BLOCK_M queries), looping over keys in BLOCK_N blocks with
the online softmax; the last blocks of windows whose N is not a multiple of the block (49, 144, 196, 576,
10x6, ...) are masked. Blocks are small (64 x 64 at most, see ``_FORWARD_TILES``): a whole 144..256-token
window per program spilled registers in the sm_90 compile, the bias gather being the big consumer.

Backward (P recomputed from the saved lse, flash-attention 2 style), three launches, no atomics, so every
gradient is bitwise reproducible run to run:

1. dk / dv: one program per (window, head, key block), looping over query blocks; each window's k and v
   belong to that window only, so no reduction across programs is needed.
2. dq and the bias gradient: one program per (chunk of consecutive windows, head, query block), looping over
   the chunk's windows. Chunks never straddle images, so the global query is loaded once per program and its
   gradient is summed over the chunk in registers. The per-chunk sum of dS (the score gradient, which is
   also dB) goes to an fp32 (chunks, heads, N, N) scratch -- kept in registers when one key block holds the
   window, else read-modify-written (the program owns its rows, so this is race free).
   The chunk count is a function of the shape only (not of the device), so the summation order is fixed.
3. bias gather: one program per (block of table rows, head) sums, over chunks and in a fixed order, the
   (i, j) pairs with that relative offset -- they lie on one diagonal of the N x N matrix, j = i - (dy ww + dx).
The global-query gradient is the per-chunk partials summed over each image's chunks (a torch sum over a
fixed-size dim, deterministic). ``deterministic=False`` is accepted and currently takes the same path:
there is no atomics-based variant.
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# globals a @triton.jit function reads must be constexpr
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _program_coords(num_blocks, NUM_HEADS: tl.constexpr):
    """(token block, head, window or chunk) of this program. Every program index is on grid x: grid y / z
    are limited to 65,535."""
    pid = tl.program_id(0)
    return pid % num_blocks, (pid // num_blocks) % NUM_HEADS, pid // (num_blocks * NUM_HEADS)


@triton.jit
def _map_offsets(window, tokens, windows_per_image, windows_per_row, stride_b, stride_h, stride_w,
                 WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr):
    """int64 element offsets of `tokens` of `window` in a (B, H, W, *) map (window partition by arithmetic)."""
    image = window // windows_per_image
    in_image = window % windows_per_image
    rows = (in_image // windows_per_row) * WINDOW_H + tokens // WINDOW_W
    cols = (in_image % windows_per_row) * WINDOW_W + tokens % WINDOW_W
    return image.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_h + cols.to(tl.int64) * stride_w


@triton.jit
def _scores_log2(q, k, rel_pos_bias_table_ptr, head, q_tokens, k_tokens, scale_log2,
                 NUM_HEADS: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(scale q k^T + B) * log2(e) for a (queries, keys) tile; padded keys are -inf, padded queries finite."""
    N: tl.constexpr = WINDOW_H * WINDOW_W
    s = tl.dot(q, tl.trans(k), out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION) * scale_log2
    # idx(i, j) = code(i) - code(j) + code(wh - 1, ww - 1) with code(y, x) = y * (2 ww - 1) + x: the divisions
    # run on the token vectors, and a tile element costs one subtraction
    q_codes = (q_tokens // WINDOW_W) * (2 * WINDOW_W - 1) + q_tokens % WINDOW_W
    k_codes = ((k_tokens // WINDOW_W) * (2 * WINDOW_W - 1) + k_tokens % WINDOW_W
               - (WINDOW_H * (2 * WINDOW_W - 1) - WINDOW_W))
    valid = (q_tokens[:, None] < N) & (k_tokens[None, :] < N)
    bias = tl.load(rel_pos_bias_table_ptr + (q_codes[:, None] - k_codes[None, :]) * NUM_HEADS + head, mask=valid,
                   other=0.0)
    s = s + bias.to(ACC_DTYPE) * LOG2E
    return tl.where(k_tokens[None, :] < N, s, float("-inf"))


@triton.jit
def _load_query(qkv_ptr, global_query_ptr, window, head, q_tokens, dims, windows_per_image, windows_per_row,
                windows_per_query, stride_b, stride_h, stride_w,
                NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
                GLOBAL_QUERY: tl.constexpr):
    N: tl.constexpr = WINDOW_H * WINDOW_W
    C: tl.constexpr = NUM_HEADS * HEAD_DIM
    if GLOBAL_QUERY:
        rows = (window // windows_per_query).to(tl.int64) * (N * C) + q_tokens * C
        ptrs = global_query_ptr + rows[:, None] + head * HEAD_DIM + dims[None, :]
    else:
        rows = _map_offsets(window, q_tokens, windows_per_image, windows_per_row, stride_b, stride_h, stride_w,
                            WINDOW_H, WINDOW_W)
        ptrs = qkv_ptr + rows[:, None] + head * HEAD_DIM + dims[None, :]
    return tl.load(ptrs, mask=(q_tokens < N)[:, None], other=0.0)


@triton.jit
def _window_attention_fwd_kernel(
    qkv_ptr, global_query_ptr, rel_pos_bias_table_ptr, out_ptr, lse_ptr,
    stride_qkv_b, stride_qkv_h, stride_qkv_w, stride_out_b, stride_out_h, stride_out_w,
    windows_per_image, windows_per_row, windows_per_query, num_q_blocks, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
    GLOBAL_QUERY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    N: tl.constexpr = WINDOW_H * WINDOW_W
    C: tl.constexpr = NUM_HEADS * HEAD_DIM
    # k is slot 0 of a global block's (k, v) channels, slot 1 of a local block's (q, k, v)
    K_SLOT: tl.constexpr = 0 if GLOBAL_QUERY else 1
    q_block, head, window = _program_coords(num_q_blocks, NUM_HEADS)

    dims = tl.arange(0, HEAD_DIM)
    q_tokens = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_query(qkv_ptr, global_query_ptr, window, head, q_tokens, dims, windows_per_image, windows_per_row,
                    windows_per_query, stride_qkv_b, stride_qkv_h, stride_qkv_w,
                    NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, GLOBAL_QUERY)
    k_channels = K_SLOT * C + head * HEAD_DIM + dims

    row_max = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), ACC_DTYPE)
    for start in range(0, N, BLOCK_N):
        k_tokens = start + tl.arange(0, BLOCK_N)
        k_rows = _map_offsets(window, k_tokens, windows_per_image, windows_per_row,
                              stride_qkv_b, stride_qkv_h, stride_qkv_w, WINDOW_H, WINDOW_W)
        k_mask = (k_tokens < N)[:, None]
        k = tl.load(qkv_ptr + k_rows[:, None] + k_channels[None, :], mask=k_mask, other=0.0)
        v = tl.load(qkv_ptr + k_rows[:, None] + (k_channels + C)[None, :], mask=k_mask, other=0.0)
        s = _scores_log2(q, k, rel_pos_bias_table_ptr, head, q_tokens, k_tokens, scale_log2,
                         NUM_HEADS, WINDOW_H, WINDOW_W, ACC_DTYPE, INPUT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp2(s - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=ACC_DTYPE,
                                                 input_precision=INPUT_PRECISION)
        row_max = new_max

    q_valid = q_tokens < N
    out_rows = _map_offsets(window, q_tokens, windows_per_image, windows_per_row,
                            stride_out_b, stride_out_h, stride_out_w, WINDOW_H, WINDOW_W)
    out = acc / row_sum[:, None]
    tl.store(out_ptr + out_rows[:, None] + head * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_valid[:, None])
    lse = (row_max + tl.log2(row_sum)) * LN2
    tl.store(lse_ptr + (window.to(tl.int64) * NUM_HEADS + head) * N + q_tokens, lse.to(tl.float32), mask=q_valid)


@triton.jit
def _probabilities_and_score_grad(q, k, v, grad_out, lse_log2, delta, rel_pos_bias_table_ptr, head,
                                  q_tokens, k_tokens, scale_log2,
                                  NUM_HEADS: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
                                  ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """P recomputed from lse, and dS = P * (dO v^T - delta): the gradient of the scores, which is also dB."""
    N: tl.constexpr = WINDOW_H * WINDOW_W
    s = _scores_log2(q, k, rel_pos_bias_table_ptr, head, q_tokens, k_tokens, scale_log2,
                     NUM_HEADS, WINDOW_H, WINDOW_W, ACC_DTYPE, INPUT_PRECISION)
    p = tl.where((q_tokens < N)[:, None], tl.exp2(s - lse_log2[:, None]), 0.0)
    grad_p = tl.dot(grad_out, tl.trans(v), out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)
    return p, p * (grad_p - delta[:, None])


@triton.jit
def _load_query_side(out_ptr, grad_out_ptr, lse_ptr, window, head, q_tokens, dims,
                     windows_per_image, windows_per_row, stride_out_b, stride_out_h, stride_out_w,
                     stride_grad_out_b, stride_grad_out_h, stride_grad_out_w,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW_H: tl.constexpr,
                     WINDOW_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dO, lse * log2(e) and delta = rowsum(dO * O) of a query block (delta recomputed: no extra launch)."""
    N: tl.constexpr = WINDOW_H * WINDOW_W
    q_mask = (q_tokens < N)[:, None]
    channels = head * HEAD_DIM + dims[None, :]
    out_rows = _map_offsets(window, q_tokens, windows_per_image, windows_per_row,
                            stride_out_b, stride_out_h, stride_out_w, WINDOW_H, WINDOW_W)
    grad_out_rows = _map_offsets(window, q_tokens, windows_per_image, windows_per_row,
                                 stride_grad_out_b, stride_grad_out_h, stride_grad_out_w, WINDOW_H, WINDOW_W)
    out = tl.load(out_ptr + out_rows[:, None] + channels, mask=q_mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + grad_out_rows[:, None] + channels, mask=q_mask, other=0.0)
    delta = tl.sum(grad_out.to(ACC_DTYPE) * out.to(ACC_DTYPE), 1)
    lse = tl.load(lse_ptr + (window.to(tl.int64) * NUM_HEADS + head) * N + q_tokens, mask=q_tokens < N, other=0.0)
    return grad_out, lse.to(ACC_DTYPE) * LOG2E, delta


@triton.jit
def _window_attention_bwd_dkdv_kernel(
    qkv_ptr, global_query_ptr, rel_pos_bias_table_ptr, out_ptr, grad_out_ptr, lse_ptr, grad_qkv_ptr,
    stride_qkv_b, stride_qkv_h, stride_qkv_w, stride_out_b, stride_out_h, stride_out_w,
    stride_grad_out_b, stride_grad_out_h, stride_grad_out_w, stride_grad_qkv_b, stride_grad_qkv_h, stride_grad_qkv_w,
    windows_per_image, windows_per_row, windows_per_query, num_k_blocks, scale, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
    GLOBAL_QUERY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    N: tl.constexpr = WINDOW_H * WINDOW_W
    C: tl.constexpr = NUM_HEADS * HEAD_DIM
    K_SLOT: tl.constexpr = 0 if GLOBAL_QUERY else 1
    k_block, head, window = _program_coords(num_k_blocks, NUM_HEADS)

    dims = tl.arange(0, HEAD_DIM)
    k_tokens = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = (k_tokens < N)[:, None]
    k_channels = K_SLOT * C + head * HEAD_DIM + dims
    k_rows = _map_offsets(window, k_tokens, windows_per_image, windows_per_row,
                          stride_qkv_b, stride_qkv_h, stride_qkv_w, WINDOW_H, WINDOW_W)
    k = tl.load(qkv_ptr + k_rows[:, None] + k_channels[None, :], mask=k_mask, other=0.0)
    v = tl.load(qkv_ptr + k_rows[:, None] + (k_channels + C)[None, :], mask=k_mask, other=0.0)

    grad_k = tl.zeros((BLOCK_N, HEAD_DIM), ACC_DTYPE)
    grad_v = tl.zeros((BLOCK_N, HEAD_DIM), ACC_DTYPE)
    for start in range(0, N, BLOCK_M):
        q_tokens = start + tl.arange(0, BLOCK_M)
        q = _load_query(qkv_ptr, global_query_ptr, window, head, q_tokens, dims, windows_per_image,
                        windows_per_row, windows_per_query, stride_qkv_b, stride_qkv_h, stride_qkv_w,
                        NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, GLOBAL_QUERY)
        grad_out, lse_log2, delta = _load_query_side(
            out_ptr, grad_out_ptr, lse_ptr, window, head, q_tokens, dims, windows_per_image, windows_per_row,
            stride_out_b, stride_out_h, stride_out_w, stride_grad_out_b, stride_grad_out_h, stride_grad_out_w,
            NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, ACC_DTYPE)
        p, grad_s = _probabilities_and_score_grad(q, k, v, grad_out, lse_log2, delta, rel_pos_bias_table_ptr, head,
                                                  q_tokens, k_tokens, scale_log2,
                                                  NUM_HEADS, WINDOW_H, WINDOW_W, ACC_DTYPE, INPUT_PRECISION)
        grad_v += tl.dot(tl.trans(p).to(grad_out.dtype), grad_out, out_dtype=ACC_DTYPE,
                         input_precision=INPUT_PRECISION)
        grad_k += tl.dot(tl.trans(grad_s).to(q.dtype), q, out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)

    grad_rows = _map_offsets(window, k_tokens, windows_per_image, windows_per_row,
                             stride_grad_qkv_b, stride_grad_qkv_h, stride_grad_qkv_w, WINDOW_H, WINDOW_W)
    grad_ptrs = grad_qkv_ptr + grad_rows[:, None] + k_channels[None, :]
    tl.store(grad_ptrs, (grad_k * scale).to(grad_qkv_ptr.dtype.element_ty), mask=k_mask)
    tl.store(grad_ptrs + C, grad_v.to(grad_qkv_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _window_attention_bwd_dq_dbias_kernel(
    qkv_ptr, global_query_ptr, rel_pos_bias_table_ptr, out_ptr, grad_out_ptr, lse_ptr, grad_qkv_ptr,
    grad_global_query_partial_ptr, grad_bias_partial_ptr,
    stride_qkv_b, stride_qkv_h, stride_qkv_w, stride_out_b, stride_out_h, stride_out_w,
    stride_grad_out_b, stride_grad_out_h, stride_grad_out_w, stride_grad_qkv_b, stride_grad_qkv_h, stride_grad_qkv_w,
    windows_per_image, windows_per_row, windows_per_query, windows_per_group, windows_per_chunk, chunks_per_group,
    num_q_blocks, scale, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
    GLOBAL_QUERY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    N: tl.constexpr = WINDOW_H * WINDOW_W
    C: tl.constexpr = NUM_HEADS * HEAD_DIM
    K_SLOT: tl.constexpr = 0 if GLOBAL_QUERY else 1
    ONE_KEY_BLOCK: tl.constexpr = BLOCK_N >= N
    q_block, head, chunk = _program_coords(num_q_blocks, NUM_HEADS)
    # chunks split each group (an image, or the windows sharing one global query) and never straddle two
    group = chunk // chunks_per_group
    first_window = group * windows_per_group + (chunk % chunks_per_group) * windows_per_chunk
    end_window = tl.minimum(first_window + windows_per_chunk, (group + 1) * windows_per_group)

    dims = tl.arange(0, HEAD_DIM)
    q_tokens = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = (q_tokens < N)[:, None]
    k_channels = K_SLOT * C + head * HEAD_DIM + dims
    bias_partial_rows = grad_bias_partial_ptr + ((chunk.to(tl.int64) * NUM_HEADS + head) * N + q_tokens) * N
    if GLOBAL_QUERY:
        q = _load_query(qkv_ptr, global_query_ptr, first_window, head, q_tokens, dims, windows_per_image,
                        windows_per_row, windows_per_query, stride_qkv_b, stride_qkv_h, stride_qkv_w,
                        NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, GLOBAL_QUERY)
    grad_q = tl.zeros((BLOCK_M, HEAD_DIM), ACC_DTYPE)
    grad_bias = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for i in range(0, end_window - first_window):
        window = first_window + i  # a tensor, also under the interpreter (where loop variables are ints)
        if not GLOBAL_QUERY:
            q = _load_query(qkv_ptr, global_query_ptr, window, head, q_tokens, dims, windows_per_image,
                            windows_per_row, windows_per_query, stride_qkv_b, stride_qkv_h, stride_qkv_w,
                            NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, GLOBAL_QUERY)
            grad_q = tl.zeros((BLOCK_M, HEAD_DIM), ACC_DTYPE)
        grad_out, lse_log2, delta = _load_query_side(
            out_ptr, grad_out_ptr, lse_ptr, window, head, q_tokens, dims, windows_per_image, windows_per_row,
            stride_out_b, stride_out_h, stride_out_w, stride_grad_out_b, stride_grad_out_h, stride_grad_out_w,
            NUM_HEADS, HEAD_DIM, WINDOW_H, WINDOW_W, ACC_DTYPE)
        for start in range(0, N, BLOCK_N):
            k_tokens = start + tl.arange(0, BLOCK_N)
            k_mask = (k_tokens < N)[:, None]
            k_rows = _map_offsets(window, k_tokens, windows_per_image, windows_per_row,
                                  stride_qkv_b, stride_qkv_h, stride_qkv_w, WINDOW_H, WINDOW_W)
            k = tl.load(qkv_ptr + k_rows[:, None] + k_channels[None, :], mask=k_mask, other=0.0)
            v = tl.load(qkv_ptr + k_rows[:, None] + (k_channels + C)[None, :], mask=k_mask, other=0.0)
            p, grad_s = _probabilities_and_score_grad(q, k, v, grad_out, lse_log2, delta, rel_pos_bias_table_ptr,
                                                      head, q_tokens, k_tokens, scale_log2,
                                                      NUM_HEADS, WINDOW_H, WINDOW_W, ACC_DTYPE, INPUT_PRECISION)
            grad_q += tl.dot(grad_s.to(k.dtype), k, out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)
            if ONE_KEY_BLOCK:
                grad_bias += grad_s
            else:
                # this program alone owns these scratch rows: a plain read-modify-write is race free
                tile_ptrs = bias_partial_rows[:, None] + k_tokens[None, :]
                tile_mask = q_mask & (k_tokens < N)[None, :]
                tl.store(tile_ptrs, tl.load(tile_ptrs, mask=tile_mask, other=0.0) + grad_s, mask=tile_mask)
        if not GLOBAL_QUERY:
            grad_rows = _map_offsets(window, q_tokens, windows_per_image, windows_per_row,
                                     stride_grad_qkv_b, stride_grad_qkv_h, stride_grad_qkv_w, WINDOW_H, WINDOW_W)
            tl.store(grad_qkv_ptr + grad_rows[:, None] + head * HEAD_DIM + dims[None, :],
                     (grad_q * scale).to(grad_qkv_ptr.dtype.element_ty), mask=q_mask)
    if GLOBAL_QUERY:
        partial_rows = (chunk.to(tl.int64) * N + q_tokens) * C
        tl.store(grad_global_query_partial_ptr + partial_rows[:, None] + head * HEAD_DIM + dims[None, :],
                 grad_q * scale, mask=q_mask)
    if ONE_KEY_BLOCK:
        k_tokens = tl.arange(0, BLOCK_N)
        tl.store(bias_partial_rows[:, None] + k_tokens[None, :], grad_bias,
                 mask=q_mask & (k_tokens < N)[None, :])


@triton.jit
def _rel_pos_bias_grad_gather_kernel(
    grad_bias_partial_ptr, grad_table_ptr, num_chunks, num_table_rows,
    NUM_HEADS: tl.constexpr, WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    """grad_table[r, head] = sum over chunks, then over query i, of partial[chunk, head, i, i - offset(r)]."""
    N: tl.constexpr = WINDOW_H * WINDOW_W
    pid = tl.program_id(0)
    head = pid % NUM_HEADS
    table_rows = (pid // NUM_HEADS) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    dy = table_rows // (2 * WINDOW_W - 1) - (WINDOW_H - 1)
    dx = table_rows % (2 * WINDOW_W - 1) - (WINDOW_W - 1)
    i = tl.arange(0, BLOCK_TOKENS)
    yj = i[None, :] // WINDOW_W - dy[:, None]
    xj = i[None, :] % WINDOW_W - dx[:, None]
    valid = ((table_rows < num_table_rows)[:, None] & (i < N)[None, :] & (yj >= 0) & (yj < WINDOW_H) & (xj >= 0)
             & (xj < WINDOW_W))
    # the pairs with one relative offset lie on one diagonal: j = i - (dy * ww + dx)
    offsets = i[None, :] * (N + 1) - (dy * WINDOW_W + dx)[:, None]
    acc = tl.zeros((BLOCK_ROWS, BLOCK_TOKENS), grad_bias_partial_ptr.dtype.element_ty)
    for chunk in range(0, num_chunks):
        base = (chunk * NUM_HEADS + head).to(tl.int64) * (N * N)
        acc += tl.load(grad_bias_partial_ptr + base + offsets, mask=valid, other=0.0)
    tl.store(grad_table_ptr + table_rows * NUM_HEADS + head, tl.sum(acc, 1).to(grad_table_ptr.dtype.element_ty),
             mask=table_rows < num_table_rows)


# ------------------------------------------------------------------------------------------- launch wrappers

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp64 only runs in the interpreter (its dots are exact there), for torch.autograd.gradcheck
_INTERPRETER_DTYPES = _KERNEL_DTYPES + (torch.float64,)
# the dq / dbias scratch of one backward is capped so the chunk count never makes it large
_GRAD_BIAS_SCRATCH_BYTES = 64 << 20
# enough programs in the dq / dbias launch to fill a big GPU several times over
_DQ_TARGET_PROGRAMS = 1024


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pair(window_size) -> Tuple[int, int]:
    if isinstance(window_size, int):
        return window_size, window_size
    window_h, window_w = window_size
    return int(window_h), int(window_w)


def _input_problem(qkv, rel_pos_bias_table, num_heads, window_size, global_query) -> Optional[Tuple[type, str]]:
    """(exception type, message) for inputs the kernels cannot take, or None. Device placement not checked."""
    if not isinstance(qkv, torch.Tensor) or not isinstance(rel_pos_bias_table, torch.Tensor):
        return TypeError, "qkv and rel_pos_bias_table must be tensors"
    dtypes = _INTERPRETER_DTYPES if _interpreted() else _KERNEL_DTYPES
    if qkv.dtype not in dtypes:
        return TypeError, f"qkv dtype {qkv.dtype} not supported; expected one of {[str(d) for d in dtypes]}"
    if rel_pos_bias_table.dtype not in dtypes:
        return TypeError, f"rel_pos_bias_table dtype {rel_pos_bias_table.dtype} not supported; expected one of {dtypes}"
    if global_query is not None and global_query.dtype != qkv.dtype:
        return TypeError, f"global_query dtype {global_query.dtype} must equal qkv dtype {qkv.dtype}"
    if qkv.dim() != 4:
        return ValueError, f"qkv must be (B, H, W, S*C), got shape {tuple(qkv.shape)}"
    if qkv.stride(-1) != 1:
        return ValueError, f"qkv's last dim must have stride 1, got strides {qkv.stride()}"
    window_h, window_w = _pair(window_size)
    batch, height, width, channels_in = qkv.shape
    if window_h < 1 or window_w < 1 or height % window_h or width % window_w:
        return ValueError, f"map {height}x{width} is not divisible into {window_h}x{window_w} windows"
    slots = 3 if global_query is None else 2
    if num_heads < 1 or channels_in % (slots * num_heads):
        return ValueError, (f"qkv last dim {channels_in} must be {slots} (q,k,v slots) * num_heads ({num_heads}) "
                            f"* head_dim")
    channels = channels_in // slots
    head_dim = channels // num_heads
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return ValueError, f"head_dim {head_dim} not supported; expected a power of two in 16..128"
    if (qkv.device.type == "cuda" or _interpreted()) and not has_backward_tiles(qkv.dtype, head_dim) \
            and torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (qkv, rel_pos_bias_table, global_query)):
        return ValueError, (f"no Triton backward for {qkv.dtype} at head_dim {head_dim} (its kernels spill "
                            f"registers with every tile); use fp16 / bf16, head_dim <= 64, or no gradients")
    table_rows = (2 * window_h - 1) * (2 * window_w - 1)
    if tuple(rel_pos_bias_table.shape) != (table_rows, num_heads):
        return ValueError, (f"rel_pos_bias_table must be ({table_rows}, {num_heads}) for a {window_h}x{window_w} "
                            f"window, got {tuple(rel_pos_bias_table.shape)}")
    if window_h * window_w > 1024:
        return ValueError, f"windows of {window_h * window_w} tokens not supported (at most 1024)"
    if global_query is not None:
        tokens = window_h * window_w
        num_windows = batch * (height // window_h) * (width // window_w)
        if tuple(global_query.shape[1:]) not in ((window_h, window_w, channels), (tokens, channels)):
            return ValueError, (f"global_query must be (G, {window_h}, {window_w}, {channels}) or (G, {tokens}, "
                                f"{channels}), got {tuple(global_query.shape)}")
        if global_query.shape[0] < 1 or num_windows % global_query.shape[0]:
            return ValueError, f"{num_windows} windows are not divisible by {global_query.shape[0]} global queries"
    return None


def unsupported_reason(qkv, rel_pos_bias_table, num_heads, window_size, global_query=None) -> Optional[str]:
    """None when the Triton kernels take these inputs (shape / dtype / head_dim / window checks), else why not."""
    problem = _input_problem(qkv, rel_pos_bias_table, num_heads, window_size, global_query)
    return None if problem is None else problem[1]


def _validate(qkv, rel_pos_bias_table, num_heads, window_size, global_query, triton_launch=True) -> None:
    problem = _input_problem(qkv, rel_pos_bias_table, num_heads, window_size, global_query)
    if problem is not None:
        raise problem[0](problem[1])
    devices = {t.device for t in (qkv, rel_pos_bias_table, global_query) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"qkv, rel_pos_bias_table and global_query must be on one device, got {devices}")
    if triton_launch and qkv.device.type != "cuda" and not _interpreted():
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {qkv.device}")


class _Geometry:
    """Sizes derived from the inputs, shared by the launches."""

    def __init__(self, qkv, num_heads, window_h, window_w, global_query):
        self.batch, self.height, self.width, channels_in = qkv.shape
        self.is_global = global_query is not None
        self.channels = channels_in // (2 if self.is_global else 3)
        self.num_heads, self.head_dim = num_heads, self.channels // num_heads
        self.window_h, self.window_w, self.tokens = window_h, window_w, window_h * window_w
        self.windows_per_row = self.width // window_w
        self.windows_per_image = (self.height // window_h) * self.windows_per_row
        self.num_windows = self.batch * self.windows_per_image
        self.num_queries = global_query.shape[0] if self.is_global else self.batch
        self.windows_per_query = self.num_windows // max(1, self.num_queries)

    def constexprs(self, dtype):
        return dict(NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, WINDOW_H=self.window_h, WINDOW_W=self.window_w,
                    GLOBAL_QUERY=self.is_global, ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
                    INPUT_PRECISION=_input_precision(dtype))


def _input_precision(dtype) -> str:
    # fp32: 3xTF32 keeps ~fp32 accuracy on tensor cores; fp16/bf16 ignore it; fp64 (interpreter) is exact
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _fit(block: int, tokens: int) -> int:
    """A block no bigger than the padded window (tl.dot needs at least 16)."""
    return max(16, min(block, triton.next_power_of_2(tokens)))


def _launch(tile: Tuple[int, int, int, int], tokens: int) -> dict:
    block_m, block_n, num_warps, num_stages = tile
    return dict(BLOCK_M=_fit(block_m, tokens), BLOCK_N=_fit(block_n, tokens), num_warps=num_warps,
                num_stages=num_stages)


def _tile_class(dtype) -> str:
    """fp16 / bf16 share tiles; fp32's 3xTF32 dots need smaller ones (fp64 only runs in the interpreter)."""
    return "fp32" if dtype in (torch.float32, torch.float64) else "half"


# Launch tiles by (dtype class, head_dim), chosen without a GPU by compiling for sm_80 and sm_90
# (tests/triton_aot.py; the slow test in tests/test_window_attention.py compiles every window 7x7..32x32 and
# 10x6, local and global): the largest tile (sides 16 to 64; 2, 4 or 8 warps; 1 or 2 pipeline stages) that
# ptxas fits in the registers for all of them without spilling. The in-kernel bias gather, the int64 map
# addressing and fp32's 3xTF32 dots (each operand split into two tf32 halves) are register hungry, so tiles
# shrink as head_dim grows and more warps share one. Not yet timed on a GPU: a tuning pass there may pick others.
# fp32 at head_dim 128 has no backward tiles: both backward kernels spilled with every tile tried, with 3xTF32
# dots (16 x 16 with 1 to 16 warps included: their two 16 x 128 dot operands, q and dO, in two tf32 halves each,
# need about 256 registers per thread) and with exact FMA dots (16 x 16, 16 x 32, 32 x 16; 4 or 8 warps).
# ``_input_problem`` turns such gradients away (the model then runs the reference). No GC ViT variant has
# head_dim 128 (all have 32), and fp16 / bf16 at head_dim 128 are clean.
_FORWARD_TILES = {  # queries per program (BLOCK_M) x keys per online-softmax step (BLOCK_N)
    ("half", 16): (32, 64, 4, 2), ("half", 32): (32, 64, 4, 2),
    ("half", 64): (64, 32, 8, 2), ("half", 128): (32, 32, 8, 2),
    ("fp32", 16): (64, 32, 8, 2), ("fp32", 32): (64, 32, 8, 2),
    ("fp32", 64): (32, 32, 8, 2), ("fp32", 128): (16, 32, 8, 2),
}
_BACKWARD_DKDV_TILES = {  # queries per step (BLOCK_M) x keys per program (BLOCK_N)
    ("half", 16): (32, 32, 8, 2), ("half", 32): (32, 32, 8, 2),
    ("half", 64): (32, 32, 8, 2), ("half", 128): (32, 16, 8, 1),
    ("fp32", 16): (16, 16, 4, 2), ("fp32", 32): (32, 16, 4, 2),
    ("fp32", 64): (16, 32, 8, 2),
}
# queries per program (BLOCK_M) x keys per step (BLOCK_N), as (windows of up to 64 tokens, bigger windows):
# with BLOCK_N 64 a small window is one key block and its bias-gradient tile stays in registers. fp16 / bf16 at
# head_dim 32 keep GC ViT's 16 x 64 tile for 7x7 windows, with 8 warps and 1 stage (4 warps spilled for 10x6).
_BACKWARD_DQ_DBIAS_TILES = {
    ("half", 16): ((16, 64, 4, 2), (32, 32, 8, 2)), ("half", 32): ((16, 64, 8, 1), (32, 32, 8, 2)),
    ("half", 64): ((16, 64, 4, 2), (32, 32, 8, 2)), ("half", 128): ((16, 64, 8, 1), (16, 32, 8, 2)),
    ("fp32", 16): ((64, 16, 8, 2), (64, 16, 8, 2)), ("fp32", 32): ((16, 64, 8, 2), (16, 64, 8, 2)),
    ("fp32", 64): ((16, 32, 8, 1), (16, 32, 8, 2)),
}
# the window size up to which _BACKWARD_DQ_DBIAS_TILES' first column applies
_SMALL_WINDOW_TOKENS = 64


def has_backward_tiles(dtype, head_dim: int) -> bool:
    return (_tile_class(dtype), head_dim) in _BACKWARD_DKDV_TILES


def forward_config(tokens: int, head_dim: int, dtype=torch.float16) -> dict:
    """Queries per program (BLOCK_M), keys per online-softmax step (BLOCK_N)."""
    return _launch(_FORWARD_TILES[_tile_class(dtype), head_dim], tokens)


def backward_dkdv_config(tokens: int, head_dim: int, dtype=torch.float16) -> dict:
    """Queries per step (BLOCK_M), keys per program (BLOCK_N)."""
    return _launch(_BACKWARD_DKDV_TILES[_tile_class(dtype), head_dim], tokens)


def backward_dq_dbias_config(tokens: int, head_dim: int, dtype=torch.float16) -> dict:
    """Queries per program (BLOCK_M), keys per step (BLOCK_N). When one key block holds the window
    (BLOCK_N >= tokens) the bias-gradient tile stays in registers over the chunk; otherwise the kernel
    accumulates it in the scratch."""
    small_window_tile, big_window_tile = _BACKWARD_DQ_DBIAS_TILES[_tile_class(dtype), head_dim]
    return _launch(small_window_tile if tokens <= _SMALL_WINDOW_TOKENS else big_window_tile, tokens)


# The interpreter has no registers to run out of and costs per program step, so it takes the biggest tiles
# (tests/test_window_attention.py checks the GPU shapes by compiling them, and forces small tiles once).
_INTERPRETER_BLOCK = 64


def _for_device(config: dict, tokens: int) -> dict:
    if _interpreted() and _INTERPRETER_BLOCK:
        block = _fit(_INTERPRETER_BLOCK, tokens)
        return dict(config, BLOCK_M=block, BLOCK_N=block)
    return config


def gather_config(tokens: int) -> dict:
    block_tokens = triton.next_power_of_2(tokens)
    return dict(BLOCK_ROWS=max(1, min(16, 4096 // block_tokens)), BLOCK_TOKENS=block_tokens, num_warps=4)


def window_attention_fwd_triton(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale):
    """Launch the forward: returns (out (B, H, W, C), lse (T, heads, N) float32)."""
    _validate(qkv, rel_pos_bias_table, num_heads, (window_h, window_w), global_query)
    geo = _Geometry(qkv, num_heads, window_h, window_w, global_query)
    table = rel_pos_bias_table.contiguous()
    queries = (global_query.reshape(geo.num_queries, geo.tokens, geo.channels).contiguous()
               if geo.is_global else qkv)
    out = qkv.new_empty(geo.batch, geo.height, geo.width, geo.channels)
    lse = qkv.new_empty(geo.num_windows, num_heads, geo.tokens, dtype=torch.float32)
    if geo.num_windows == 0:
        return out, lse
    config = _for_device(forward_config(geo.tokens, geo.head_dim, qkv.dtype), geo.tokens)
    num_q_blocks = triton.cdiv(geo.tokens, config["BLOCK_M"])
    grid = (geo.num_windows * num_heads * num_q_blocks,)
    _window_attention_fwd_kernel[grid](
        qkv, queries, table, out, lse,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        geo.windows_per_image, geo.windows_per_row, geo.windows_per_query, num_q_blocks, scale * LOG2E.value,
        **geo.constexprs(qkv.dtype), **config,
    )
    return out, lse


def _chunking(geo: _Geometry, num_q_blocks: int) -> Tuple[int, int, int, int]:
    """(windows_per_group, chunks_per_group, windows_per_chunk, num_chunks): a function of the shape only."""
    windows_per_group = geo.windows_per_query if geo.is_global else geo.windows_per_image
    num_groups = geo.num_windows // windows_per_group
    by_parallelism = triton.cdiv(_DQ_TARGET_PROGRAMS, num_groups * geo.num_heads * num_q_blocks)
    by_memory = _GRAD_BIAS_SCRATCH_BYTES // (num_groups * geo.num_heads * geo.tokens * geo.tokens * 4)
    chunks_per_group = max(1, min(windows_per_group, by_parallelism, by_memory))
    windows_per_chunk = triton.cdiv(windows_per_group, chunks_per_group)
    chunks_per_group = triton.cdiv(windows_per_group, windows_per_chunk)
    return windows_per_group, chunks_per_group, windows_per_chunk, num_groups * chunks_per_group


def window_attention_bwd_triton(grad_out, qkv, rel_pos_bias_table, global_query, out, lse, num_heads, window_h,
                                window_w, scale, deterministic=True):
    """Launch the backward: (grad_qkv, grad_rel_pos_bias_table, grad_global_query or an empty tensor).

    Every path is deterministic (no atomics); ``deterministic`` is accepted for the op's schema."""
    geo = _Geometry(qkv, num_heads, window_h, window_w, global_query)
    table = rel_pos_bias_table.contiguous()
    queries = (global_query.reshape(geo.num_queries, geo.tokens, geo.channels).contiguous()
               if geo.is_global else qkv)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    acc_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    if geo.num_windows == 0:
        return (torch.zeros(qkv.shape, dtype=qkv.dtype, device=qkv.device), torch.zeros_like(rel_pos_bias_table),
                torch.zeros_like(global_query) if geo.is_global else qkv.new_empty(0))
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    constexprs = geo.constexprs(qkv.dtype)
    strides = (qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
               grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
               grad_qkv.stride(0), grad_qkv.stride(1), grad_qkv.stride(2))

    config = _for_device(backward_dkdv_config(geo.tokens, geo.head_dim, qkv.dtype), geo.tokens)
    num_k_blocks = triton.cdiv(geo.tokens, config["BLOCK_N"])
    _window_attention_bwd_dkdv_kernel[(geo.num_windows * num_heads * num_k_blocks,)](
        qkv, queries, table, out, grad_out, lse, grad_qkv, *strides,
        geo.windows_per_image, geo.windows_per_row, geo.windows_per_query, num_k_blocks, scale, scale * LOG2E.value,
        **constexprs, **config,
    )

    config = _for_device(backward_dq_dbias_config(geo.tokens, geo.head_dim, qkv.dtype), geo.tokens)
    num_q_blocks = triton.cdiv(geo.tokens, config["BLOCK_M"])
    windows_per_group, chunks_per_group, windows_per_chunk, num_chunks = _chunking(geo, num_q_blocks)
    one_key_block = config["BLOCK_N"] >= geo.tokens
    # one key block: the kernel stores every entry once; several: it accumulates into zeros
    scratch = torch.empty if one_key_block else torch.zeros
    grad_bias_partial = scratch(num_chunks, num_heads, geo.tokens, geo.tokens, dtype=acc_dtype, device=qkv.device)
    grad_global_query_partial = (torch.empty(num_chunks, geo.tokens, geo.channels, dtype=acc_dtype,
                                             device=qkv.device) if geo.is_global else grad_bias_partial)
    _window_attention_bwd_dq_dbias_kernel[(num_chunks * num_heads * num_q_blocks,)](
        qkv, queries, table, out, grad_out, lse, grad_qkv, grad_global_query_partial, grad_bias_partial, *strides,
        geo.windows_per_image, geo.windows_per_row, geo.windows_per_query, windows_per_group, windows_per_chunk,
        chunks_per_group, num_q_blocks, scale, scale * LOG2E.value,
        **constexprs, **config,
    )

    grad_table = torch.empty(table.shape, dtype=acc_dtype, device=qkv.device)
    config = gather_config(geo.tokens)
    _rel_pos_bias_grad_gather_kernel[(triton.cdiv(table.shape[0], config["BLOCK_ROWS"]) * num_heads,)](
        grad_bias_partial, grad_table, num_chunks, table.shape[0],
        NUM_HEADS=num_heads, WINDOW_H=window_h, WINDOW_W=window_w, **config,
    )
    if geo.is_global:
        # fixed-shape sum over each group's chunks: deterministic
        grad_global_query = grad_global_query_partial.view(geo.num_queries, chunks_per_group, geo.tokens,
                                                           geo.channels).sum(1)
        grad_global_query = grad_global_query.to(global_query.dtype).reshape(global_query.shape)
    else:
        grad_global_query = qkv.new_empty(0)
    return grad_qkv, grad_table.to(rel_pos_bias_table.dtype), grad_global_query


# ------------------------------------------------------------------------------------------------- autograd


def _scale_for(qkv, num_heads, global_query, scale) -> float:
    if scale is not None:
        return float(scale)
    channels = qkv.shape[-1] // (2 if global_query is not None else 3)
    return (channels // num_heads) ** -0.5


class _WindowAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale, deterministic):
        out, lse = window_attention_fwd_triton(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w,
                                               scale)
        ctx.save_for_backward(qkv, rel_pos_bias_table, global_query, out, lse)
        ctx.params = (num_heads, window_h, window_w, scale, deterministic)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, rel_pos_bias_table, global_query, out, lse = ctx.saved_tensors
        grad_qkv, grad_table, grad_global_query = window_attention_bwd_triton(
            grad_out, qkv, rel_pos_bias_table, global_query, out, lse, *ctx.params)
        return (grad_qkv, grad_table, grad_global_query if global_query is not None else None,
                None, None, None, None, None)


def window_attention_triton(qkv, rel_pos_bias_table, num_heads, window_size, global_query=None, scale=None, *,
                            deterministic=True) -> torch.Tensor:
    """Window attention through the Triton launches directly (no op registry); autograd-aware.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    window_h, window_w = _pair(window_size)
    _validate(qkv, rel_pos_bias_table, num_heads, (window_h, window_w), global_query)
    return _WindowAttentionTriton.apply(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w,
                                        _scale_for(qkv, num_heads, global_query, scale), deterministic)


# ---------------------------------------------------------------------------------------------- custom ops


# explicit schemas: the CPU kernels (gcvit_kernels.cpu) are written against exactly these (int, not SymInt)
WINDOW_ATTENTION_FWD_SCHEMA = ("(Tensor qkv, Tensor rel_pos_bias_table, Tensor? global_query, int num_heads, "
                               "int window_h, int window_w, float scale) -> (Tensor out, Tensor lse)")
WINDOW_ATTENTION_BWD_SCHEMA = ("(Tensor grad_out, Tensor qkv, Tensor rel_pos_bias_table, Tensor? global_query, "
                               "Tensor out, Tensor lse, int num_heads, int window_h, int window_w, float scale, "
                               "bool deterministic) -> (Tensor grad_qkv, Tensor grad_rel_pos_bias_table, "
                               "Tensor grad_global_query)")


@torch.library.custom_op("gcvit::window_attention_fwd", mutates_args=(), device_types="cuda",
                         schema=WINDOW_ATTENTION_FWD_SCHEMA)
def _window_attention_fwd_op(qkv: torch.Tensor, rel_pos_bias_table: torch.Tensor,
                             global_query: Optional[torch.Tensor], num_heads: int, window_h: int, window_w: int,
                             scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return window_attention_fwd_triton(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale)


@_window_attention_fwd_op.register_fake
def _window_attention_fwd_fake(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale):
    batch, height, width, channels_in = qkv.shape
    channels = channels_in // (2 if global_query is not None else 3)
    num_windows = batch * (height // window_h) * (width // window_w)
    return (qkv.new_empty(batch, height, width, channels),
            qkv.new_empty(num_windows, num_heads, window_h * window_w, dtype=torch.float32))


@torch.library.custom_op("gcvit::window_attention_bwd", mutates_args=(), device_types="cuda",
                         schema=WINDOW_ATTENTION_BWD_SCHEMA)
def _window_attention_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, rel_pos_bias_table: torch.Tensor,
                             global_query: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                             num_heads: int, window_h: int, window_w: int, scale: float,
                             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_bwd_triton(grad_out, qkv, rel_pos_bias_table, global_query, out, lse, num_heads,
                                       window_h, window_w, scale, deterministic)


@_window_attention_bwd_op.register_fake
def _window_attention_bwd_fake(grad_out, qkv, rel_pos_bias_table, global_query, out, lse, num_heads, window_h,
                               window_w, scale, deterministic):
    grad_global_query = torch.empty_like(global_query) if global_query is not None else qkv.new_empty(0)
    return (qkv.new_empty(qkv.shape), torch.empty_like(rel_pos_bias_table), grad_global_query)


def _fwd_setup_context(ctx, inputs, output):
    qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, rel_pos_bias_table, global_query, out, lse)
    ctx.params = (num_heads, window_h, window_w, scale)
    ctx.has_global_query = global_query is not None


def _fwd_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; its gradient is not propagated
    qkv, rel_pos_bias_table, global_query, out, lse = ctx.saved_tensors
    num_heads, window_h, window_w, scale = ctx.params
    # the forward schema carries no flag; the backward path is deterministic either way
    grad_qkv, grad_table, grad_global_query = torch.ops.gcvit.window_attention_bwd(
        grad_out.contiguous(), qkv, rel_pos_bias_table, global_query, out, lse, num_heads, window_h, window_w, scale,
        True)
    return grad_qkv, grad_table, (grad_global_query if ctx.has_global_query else None), None, None, None, None


_window_attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def window_attention(qkv, rel_pos_bias_table, num_heads, window_size, global_query=None, scale=None, *,
                     deterministic=True) -> torch.Tensor:
    """Window attention through ``gcvit::window_attention_fwd`` (autograd-aware; torch.compile traces it).

    Raises TypeError / ValueError for inputs the kernels cannot take, before anything is launched.
    ``deterministic``: the backward is bitwise reproducible; every current path is, so the flag only documents it.
    """
    window_h, window_w = _pair(window_size)
    # the op also has CPU kernels (gcvit_kernels.cpu), so the device type is the registry's business
    _validate(qkv, rel_pos_bias_table, num_heads, (window_h, window_w), global_query, triton_launch=False)
    out, _ = torch.ops.gcvit.window_attention_fwd(qkv, rel_pos_bias_table, global_query, num_heads, window_h,
                                                  window_w, _scale_for(qkv, num_heads, global_query, scale))
    return out
