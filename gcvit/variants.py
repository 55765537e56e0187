"""Configurations of every GC ViT variant of the official NVlabs/GCVit code (and timm's subset).

Params and GFLOPs are the published figures (NVlabs README, paper table); ``official_params`` is the exact
count of the model the official code builds (its table prints 34.54M as 34, 68.62M as 68 and 202.08M as 201).
Window sizes are derived from the input size as timm does (``img_size // window_ratio`` per stage), which
reproduces the official fixed windows: (7, 7, 14, 7) at 224, (12, 12, 24, 12) at 384, (16, 16, 32, 16) at 512.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Variant:
    name: str
    depths: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int]
    embed_dim: int
    mlp_ratio: float
    layer_scale: Optional[float] = None
    img_size: int = 224
    timm_name: Optional[str] = None  # the timm model with the same architecture, if timm has it
    official_name: str = ""
    published_params_m: float = 0.0
    published_gflops: float = 0.0
    official_params: int = 0  # exact count of the official code's model (the published table rounds it)


_TINY_HEADS = (2, 4, 8, 16)
_SMALL_HEADS = (3, 6, 12, 24)
_BASE_HEADS = (4, 8, 16, 32)
_LARGE_HEADS = (6, 12, 24, 48)
_DEEP = (3, 4, 19, 5)

VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("xxtiny", (2, 2, 6, 2), _TINY_HEADS, 64, 3.0, None, 224, "gcvit_xxtiny", "gc_vit_xxtiny", 12, 2.1, 11995428),
    Variant("xtiny", (3, 4, 6, 5), _TINY_HEADS, 64, 3.0, None, 224, "gcvit_xtiny", "gc_vit_xtiny", 20, 2.6, 19981294),
    Variant("tiny", _DEEP, _TINY_HEADS, 64, 3.0, None, 224, "gcvit_tiny", "gc_vit_tiny", 28, 4.7, 28221974),
    Variant("tiny2", (3, 4, 29, 5), _TINY_HEADS, 64, 3.0, None, 224, None, "gc_vit_tiny2", 34, 5.5, 34535654),
    Variant("small", _DEEP, _SMALL_HEADS, 96, 2.0, 1e-5, 224, "gcvit_small", "gc_vit_small", 51, 8.5, 51092173),
    Variant("small2", (3, 4, 23, 5), _SMALL_HEADS, 96, 3.0, 1e-5, 224, None, "gc_vit_small2", 68, 10.7, 68615197),
    Variant("base", _DEEP, _BASE_HEADS, 128, 2.0, 1e-5, 224, "gcvit_base", "gc_vit_base", 90, 14.8, 90320836),
    Variant("large", _DEEP, _LARGE_HEADS, 192, 2.0, 1e-5, 224, None, "gc_vit_large", 201, 32.6, 202075570),
    Variant("large_384", _DEEP, _LARGE_HEADS, 192, 2.0, 1e-5, 384, None, "gc_vit_large_384_21k", 201, 120.4, 202860610),
    Variant("large_512", _DEEP, _LARGE_HEADS, 192, 2.0, 1e-5, 512, None, "gc_vit_large_512_21k", 201, 245.0, 203795362),
]}

_ALIASES = {}
for _v in VARIANTS.values():
    _ALIASES[_v.official_name] = _v.name
    _ALIASES["gcvit_" + _v.name] = _v.name
    if _v.timm_name:
        _ALIASES[_v.timm_name] = _v.name


def get_variant(name: str) -> Variant:
    """Look a variant up by our name ('tiny'), timm's ('gcvit_tiny') or the official one ('gc_vit_tiny')."""
    key = _ALIASES.get(name, name)
    if key not in VARIANTS:
        raise ValueError(f"unknown GC ViT variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[key]
