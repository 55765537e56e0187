"""GC ViT (Global Context Vision Transformer, arXiv 2206.09959) in plain PyTorch.

Computes exactly what timm's ``gcvit_*`` models and the official NVlabs/GCVit code compute, with timm's
state_dict keys. Module tree::

    stem: conv 3x3/2 -> Downsample2d (LayerNorm2d, Fused-MBConv, conv 3x3/2, LayerNorm2d)
    stages[i]: [Downsample2d (i > 0)] -> global query generator (Fused-MBConv [+ max-pool 3x3/2] per level,
               repeated until the map is window-sized) -> blocks alternating local / global-query
               window attention (LayerNorm, attention, layer scale, drop path; LayerNorm, MLP, ...)
               -> LayerNorm (last stage)
    head: global average pool -> Linear

The two special ops (window attention, Fused-MBConv) are reached through :mod:`gcvit.dispatch`, the only
place that decides between the fused kernels and the reference math in :mod:`gcvit.functional`.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import dispatch
from . import functional as ref

IntOrPair = Union[int, Tuple[int, int]]


def _pair(v: IntOrPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out(size: int) -> int:
    """Output size of a 3x3 conv or max-pool with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.layer_norm(self, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SqueezeExcite(nn.Module):
    """SE with 1x1 convs, no bias, GELU, reduction to a quarter of the channels (timm's SEModule keys)."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = channels // 4
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=False)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=False)


class MbConvBlock(nn.Module):
    """Fused-MBConv: x + conv1x1(SE(GELU(dwconv3x3(x)))), no norm, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.se = SqueezeExcite(channels)
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.fused = False

    def weights(self) -> Tuple[torch.Tensor, ...]:
        return self.conv_dw.weight, self.se.fc1.weight, self.se.fc2.weight, self.conv_pw.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.fused_mbconv(self, x)


class Downsample2d(nn.Module):
    """LayerNorm2d -> Fused-MBConv -> conv 3x3/2 (dim -> dim_out) -> LayerNorm2d, all NCHW."""

    def __init__(self, dim: int, dim_out: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=norm_eps)
        self.conv_block = MbConvBlock(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = LayerNorm2d(dim_out, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


class FeatureBlock(nn.Module):
    """Global query generator: ``levels`` x (Fused-MBConv, max-pool 3x3/2); one MBConv when levels == 0."""

    def __init__(self, dim: int, levels: int):
        super().__init__()
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f"conv{i + 1}", MbConvBlock(dim))
            if i < levels:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.down = Downsample2d(dim, dim, norm_eps)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.keeps_channels_last(self, x):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.down(self.conv1(x))


class RelPosBias(nn.Module):
    """Learned relative position bias table ((2 wh - 1) (2 ww - 1), heads), timm's key names."""

    def __init__(self, window_size: Tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = window_size
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.empty(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", ref.relative_position_index(window_size), persistent=False)

    def get_bias(self) -> torch.Tensor:
        return ref.relative_position_bias(self.relative_position_bias_table, self.relative_position_index)


class WindowAttentionGlobal(nn.Module):
    """Window attention; global blocks (use_global) take the query from the image's global query."""

    def __init__(self, dim: int, num_heads: int, window_size: Tuple[int, int], use_global: bool,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_global = use_global
        self.rel_pos = RelPosBias(window_size, num_heads)
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = False

    def forward(self, x: torch.Tensor, global_query: Optional[torch.Tensor]) -> torch.Tensor:
        """x: normalised (B, H, W, C) map; global_query: (B, wh, ww, C). Returns (B, H, W, C)."""
        return dispatch.window_attention(self, x, global_query if self.use_global else None)

    def forward_reference(self, x: torch.Tensor, global_query: Optional[torch.Tensor]) -> torch.Tensor:
        """timm's order of operations: partition the map, project, attend, project, reverse."""
        _, h, w, _ = x.shape
        qkv = self.qkv(ref.window_partition(x, self.window_size))
        drop = self.attn_drop if self.attn_drop.p > 0 and self.training else None
        out = ref.windowed_attention(qkv, self.rel_pos.get_bias(), self.num_heads, global_query, self.scale, drop)
        out = self.proj_drop(self.proj(out))
        return ref.window_reverse(out, self.window_size, (h, w))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.mlp(self, x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class GlobalContextVitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: Tuple[int, int], mlp_ratio: float,
                 use_global: bool, qkv_bias: bool = True, layer_scale: Optional[float] = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttentionGlobal(dim, num_heads, window_size, use_global, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fused = False

    def forward(self, x: torch.Tensor, global_query: torch.Tensor) -> torch.Tensor:
        return dispatch.transformer_block(self, x, global_query)

    def forward_per_module(self, x: torch.Tensor, global_query: torch.Tensor) -> torch.Tensor:
        """timm's block; the attention and the MLP each dispatch on their own."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), global_query)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GlobalContextVitStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, feat_size: Tuple[int, int],
                 window_size: Tuple[int, int], downsample: bool, stage_norm: bool, mlp_ratio: float,
                 qkv_bias: bool = True, layer_scale: Optional[float] = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Sequence[float] = (), norm_eps: float = 1e-5):
        """feat_size is the map size after this stage's downsampler."""
        super().__init__()
        if downsample:
            self.downsample = Downsample2d(dim // 2, dim, norm_eps)
        else:
            self.downsample = nn.Identity()
        self.feat_size = feat_size
        self.window_size = window_size
        self.global_block = FeatureBlock(dim, global_query_levels(feat_size, window_size))
        self.blocks = nn.ModuleList([
            GlobalContextVitBlock(dim, num_heads, window_size, mlp_ratio, use_global=(i % 2 == 1),
                                  qkv_bias=qkv_bias, layer_scale=layer_scale, proj_drop=proj_drop,
                                  attn_drop=attn_drop, drop_path=drop_path[i] if drop_path else 0.0,
                                  norm_eps=norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if stage_norm else nn.Identity()
        self.dim = dim
        self.grad_checkpointing = False
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # one global query per image, NHWC and contiguous so every window's kernel program can index it
        global_query = self.global_block(x).permute(0, 2, 3, 1).contiguous()
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, global_query, use_reentrant=False)
            else:
                x = blk(x, global_query)
        x = self.norm(x).permute(0, 3, 1, 2)
        # NCHW as timm returns it; the fused CPU path keeps the NHWC memory (the next stage's convs and
        # channels-last LayerNorm read it as is) and forward_features/forward_intermediates make it contiguous
        return x if dispatch.keeps_channels_last(self, x) else x.contiguous()


def global_query_levels(feat_size: Tuple[int, int], window_size: Tuple[int, int]) -> int:
    """Number of MBConv + max-pool levels that bring the map down to the window size (timm's formula)."""
    return int(math.log2(min(feat_size) / min(window_size)))


def stage_layout(img_size: Tuple[int, int], window_size: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Map size of each stage for an input, validated: each map must tile into whole windows and its
    global query generator must reduce it exactly to one window. Raises ValueError naming the sizes."""
    h, w = conv_out(conv_out(img_size[0])), conv_out(conv_out(img_size[1]))  # stem: conv 3x3/2 twice
    sizes = []
    for i, (wh, ww) in enumerate(window_size):
        if i > 0:
            h, w = conv_out(h), conv_out(w)
        if h % wh or w % ww:
            raise ValueError(
                f"input size {tuple(img_size)} gives a {h}x{w} map at stage {i}, which windows of "
                f"{wh}x{ww} cannot tile; use an input size whose stage maps are multiples of the windows "
                f"(with the default window ratios, a multiple of 32)")
        levels = global_query_levels((h, w), (wh, ww))
        gh, gw = h, w
        for _ in range(levels):
            gh, gw = conv_out(gh), conv_out(gw)
        if (gh, gw) != (wh, ww):
            raise ValueError(
                f"input size {tuple(img_size)}: the global query of stage {i} would be {gh}x{gw}, "
                f"not the {wh}x{ww} window (map {h}x{w}); map and window must differ by a power of two")
        sizes.append((h, w))
    return sizes


class GlobalContextVit(nn.Module):
    """GC ViT. Arguments follow timm's ``GlobalContextVit`` (same names, defaults and state_dict keys)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, img_size: IntOrPair = 224,
                 window_ratio: Sequence[int] = (32, 32, 16, 32),
                 window_size: Optional[Union[IntOrPair, Sequence[IntOrPair]]] = None,
                 embed_dim: int = 64, depths: Sequence[int] = (3, 4, 19, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 mlp_ratio: float = 3.0, qkv_bias: bool = True, layer_scale: Optional[float] = None,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        img_size = _pair(img_size)
        if window_size is None:
            ratios = [window_ratio] * num_stages if isinstance(window_ratio, int) else list(window_ratio)
            window_size = [(img_size[0] // r, img_size[1] // r) for r in ratios]
        elif isinstance(window_size, int) or (len(window_size) == 2 and isinstance(window_size[0], int)
                                              and num_stages != 2):
            window_size = [_pair(window_size)] * num_stages
        else:
            window_size = [_pair(ws) for ws in window_size]
        if len(window_size) != num_stages or any(min(ws) < 1 for ws in window_size):
            raise ValueError(f"window_size must give one positive size per stage, got {window_size}")
        feat_sizes = stage_layout(img_size, window_size)

        self.img_size = img_size
        self.window_size = tuple(window_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.drop_rate = drop_rate
        self.stem = Stem(in_chans, embed_dim, norm_eps)
        total = sum(depths)
        rates = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            start = sum(depths[:i])
            stages.append(GlobalContextVitStage(
                dim=embed_dim * 2 ** i, depth=depths[i], num_heads=num_heads[i], feat_size=feat_sizes[i],
                window_size=window_size[i], downsample=i > 0, stage_norm=i == num_stages - 1,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_scale=layer_scale, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[start:start + depths[i]], norm_eps=norm_eps))
            self.feature_info.append(dict(num_chs=embed_dim * 2 ** i, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.out_indices: Optional[Tuple[int, ...]] = None
        self.set_fused(fused)

    # -- fused/reference switch -------------------------------------------------------------------------------
    def set_fused(self, fused: bool = True) -> "GlobalContextVit":
        """Route the model through the fused kernels (True) or the reference (False): attention, Fused-MBConv,
        MLP, and on the CPU the fused block ends and channels-last maps."""
        for m in self.modules():
            if isinstance(m, (WindowAttentionGlobal, MbConvBlock, Mlp, GlobalContextVitBlock, GlobalContextVitStage,
                              Stem, LayerNorm2d)):
                m.fused = bool(fused)
        self.fused = bool(fused)
        if fused:
            dispatch.prepare((self.stem.conv1.weight.device.type,))
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def no_weight_decay(self):
        return {k for k, _ in self.named_parameters() if "relative_position_bias_table" in k}

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        weight = self.stem.conv1.weight
        self.head = ClassifierHead(self.num_features, num_classes, self.drop_rate).to(weight.device, weight.dtype)

    # -- forward ----------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for inputs the model cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D (B, C, H, W) image batch, got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image batch, got dtype {x.dtype}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"this model was built for {self.img_size[0]}x{self.img_size[1]} inputs (its windows and global "
                f"queries depend on the size), got {x.shape[2]}x{x.shape[3]}; build one with img_size="
                f"{tuple(x.shape[2:])} (windows are derived from it)")
        weight = self.stem.conv1.weight
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device} but the model is on {weight.device}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.stages(self.stem(x)).contiguous()

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """The stage maps (NCHW) selected by ``indices`` (default all four): a feature pyramid for detection."""
        self.check_input(x)
        indices = range(len(self.stages)) if indices is None else list(indices)
        self._check_stage_indices(indices)
        wanted = {i % len(self.stages) for i in indices}
        feats = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                feats.append(x.contiguous())
            if i >= max(wanted):
                break
        return feats

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def _check_stage_indices(self, indices: Sequence[int]) -> None:
        bad = [i for i in indices if not -len(self.stages) <= i < len(self.stages)]
        if bad:
            raise ValueError(f"stage indices {bad} out of range for {len(self.stages)} stages")

    def as_feature_pyramid(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> "GlobalContextVit":
        """Backbone mode (timm's ``features_only``): drop the classifier; forward returns the stage maps."""
        self._check_stage_indices(out_indices)
        self.reset_classifier(0)
        self.out_indices = tuple(out_indices)
        return self

    def forward(self, x: torch.Tensor):
        with dispatch.inference_arena(self, x):
            out = dispatch.call_in_fp32_if_needed(self, x)
            if out is not None:
                return out
            if self.out_indices is not None:
                return self.forward_intermediates(x, self.out_indices)
            return self.forward_head(self.forward_features(x))


class ClassifierHead(nn.Module):
    """Global average pool, dropout, Linear (timm's ClassifierHead keys: head.fc)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)
