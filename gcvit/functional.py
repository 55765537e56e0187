"""Reference math of GC ViT's two special ops, in plain PyTorch.

This is the one place the math lives; the model's reference path and every kernel test use it.

Window attention (local and global-query), per window of N = wh * ww tokens and per head::

    out = softmax(scale * q @ k^T + B) @ v,    B[i, j] = rel_pos_bias_table[rel_pos_index[i, j], head]

Layouts (the same as the fused op in ``gcvit_kernels.window_attention``):

* ``qkv``: (B, H, W, S * C), the qkv projection applied to the (B, H, W, C) map, channels ordered
  (S, heads, head_dim), S = 3 for local blocks (q, k, v) and S = 2 for global blocks (k, v).
  A map of windows (num_windows, wh, ww, S * C) is the special case H = wh, W = ww.
* ``global_query``: (G, wh, ww, C) or (G, N, C), channels ordered (heads, head_dim), one per image;
  the windows are image-major, so window ``w`` of the T = B * (H / wh) * (W / ww) windows uses
  global query ``w // (T / G)``.
* ``rel_pos_bias_table``: ((2 wh - 1) * (2 ww - 1), heads).
* result: (B, H, W, C), channels ordered (heads, head_dim).

Fused-MBConv (no norm, no bias, as GC ViT uses it)::

    y = x + conv1x1(se(gelu(dwconv3x3(x)))),
    se(t) = t * sigmoid(W2 gelu(W1 mean_hw(t)))
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def relative_position_index(window_size: Tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) long tensor: index[i, j] = (yi - yj + wh - 1) * (2 ww - 1) + (xi - xj + ww - 1)."""
    wh, ww = window_size
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def relative_position_bias(rel_pos_bias_table: torch.Tensor, rel_pos_index: torch.Tensor) -> torch.Tensor:
    """(heads, N, N) bias gathered from the table."""
    n = rel_pos_index.shape[0]
    return rel_pos_bias_table[rel_pos_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


def window_partition(x: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/wh * W/ww, wh * ww, C), windows image-major then row-major."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window_size: Tuple[int, int], img_size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (T, wh * ww, C) -> (B, H, W, C)."""
    h, w = img_size
    wh, ww = window_size
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def windowed_attention(
    qkv_windows: torch.Tensor,
    rel_pos_bias: torch.Tensor,
    num_heads: int,
    global_query: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    attn_drop: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """Attention over windows: qkv_windows (T, N, S * C) -> (T, N, C). rel_pos_bias is (heads, N, N)."""
    t, n, sc = qkv_windows.shape
    s = 2 if global_query is not None else 3
    c = sc // s
    head_dim = c // num_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qkv = qkv_windows.reshape(t, n, s, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if global_query is not None:
        k, v = qkv.unbind(0)
        g = global_query.shape[0]
        # windows are image-major: each image's global query serves only that image's windows
        q = global_query.reshape(g, n, num_heads, head_dim).repeat_interleave(t // g, dim=0).permute(0, 2, 1, 3)
    else:
        q, k, v = qkv.unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (attn + rel_pos_bias.unsqueeze(0)).softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return (attn @ v).transpose(1, 2).reshape(t, n, c)


def window_attention(
    qkv: torch.Tensor,
    rel_pos_bias_table: torch.Tensor,
    num_heads: int,
    window_size: Tuple[int, int],
    global_query: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Window attention on the map layout (see module docstring): qkv (B, H, W, S*C) -> (B, H, W, C)."""
    b, h, w, _ = qkv.shape
    index = relative_position_index(window_size, device=qkv.device)
    bias = relative_position_bias(rel_pos_bias_table, index)
    out = windowed_attention(window_partition(qkv, window_size), bias, num_heads, global_query, scale)
    return window_reverse(out, window_size, (h, w))


def squeeze_excite(x: torch.Tensor, se_reduce_weight: torch.Tensor, se_expand_weight: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(W2 gelu(W1 mean_hw(x))); weights are 1x1 conv weights (C_rd, C, 1, 1), (C, C_rd, 1, 1)."""
    s = x.mean((2, 3), keepdim=True)
    s = F.conv2d(F.gelu(F.conv2d(s, se_reduce_weight)), se_expand_weight)
    return x * torch.sigmoid(s)


def fused_mbconv(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    se_reduce_weight: torch.Tensor,
    se_expand_weight: torch.Tensor,
    pw_weight: torch.Tensor,
) -> torch.Tensor:
    """x + conv1x1(se(gelu(dwconv3x3(x)))) on (B, C, H, W); dw_weight (C, 1, 3, 3), pw_weight (C, C, 1, 1)."""
    t = F.gelu(F.conv2d(x, dw_weight, padding=1, groups=x.shape[1]))
    t = squeeze_excite(t, se_reduce_weight, se_expand_weight)
    return x + F.conv2d(t, pw_weight)
