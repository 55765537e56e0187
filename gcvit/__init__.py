"""gcvit: GC ViT (Global Context Vision Transformer, arXiv 2206.09959), reference PyTorch model plus fused
Triton (GPU) and C++ (CPU) kernels selected with ``fused=True``.

    >>> import gcvit, torch
    >>> model = gcvit.tiny()                       # reference model, timm's state_dict keys
    >>> model = gcvit.tiny(fused=True)             # same weights and outputs, fused kernels
    >>> model = gcvit.create_model("large_384", num_classes=10, checkpoint_path="gcvit_large_384.pth.tar")
"""
import inspect
from typing import List, Optional

from .checkpoint import CheckpointError, load_checkpoint
from .dispatch import frozen_weights
from .interop import patch_timm, unpatch_timm
from .model import GlobalContextVit
from .variants import VARIANTS, Variant, get_variant

__version__ = "0.1.0"
__all__ = ["GlobalContextVit", "create_model", "list_models", "load_checkpoint", "CheckpointError", "fuse",
           "frozen_weights", "get_variant", "Variant", "patch_timm", "unpatch_timm"] + list(VARIANTS)

_OVERRIDES = set(inspect.signature(GlobalContextVit.__init__).parameters) - {"self", "fused"}


def list_models() -> List[str]:
    """Names of every variant: xxtiny, xtiny, tiny, tiny2, small, small2, base, large, large_384, large_512."""
    return list(VARIANTS)


def create_model(name: str, *, fused: bool = False, checkpoint_path: Optional[str] = None, use_ema: bool = False,
                 features_only: bool = False, out_indices=(0, 1, 2, 3), **overrides) -> GlobalContextVit:
    """Build a variant by name (ours, timm's ``gcvit_tiny`` or the official ``gc_vit_tiny``).

    ``overrides`` take timm's names (img_size, num_classes, in_chans, drop_path_rate, drop_rate, window_size,
    window_ratio, ...). ``checkpoint_path`` loads a timm- or official-layout checkpoint (all or nothing);
    ``features_only`` returns the four stage maps instead of logits (detection/segmentation backbones).
    """
    variant = get_variant(name)
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)} for {variant.name}; accepted: {sorted(_OVERRIDES)}")
    config = dict(depths=variant.depths, num_heads=variant.num_heads, embed_dim=variant.embed_dim,
                  mlp_ratio=variant.mlp_ratio, layer_scale=variant.layer_scale, img_size=variant.img_size)
    config.update(overrides)
    model = GlobalContextVit(fused=fused, **config)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, use_ema=use_ema)
    if features_only:
        model.as_feature_pyramid(out_indices)
    return model


def fuse(model: GlobalContextVit, fused: bool = True) -> GlobalContextVit:
    """Switch a built (e.g. checkpoint-loaded) model to the fused kernels in place; ``fused=False`` undoes it."""
    if not isinstance(model, GlobalContextVit):
        raise TypeError(f"gcvit.fuse expects a gcvit.GlobalContextVit, got {type(model).__name__}; "
                        "for a timm model use gcvit.patch_timm")
    return model.set_fused(fused)


def _factory(name: str):
    def factory(*, fused: bool = False, checkpoint_path: Optional[str] = None, **overrides) -> GlobalContextVit:
        return create_model(name, fused=fused, checkpoint_path=checkpoint_path, **overrides)
    v = VARIANTS[name]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"GC ViT-{name}: depths {v.depths}, heads {v.num_heads}, dim {v.embed_dim}, "
                       f"mlp_ratio {v.mlp_ratio}, {v.img_size}x{v.img_size} (published {v.published_params_m}M "
                       f"params, {v.published_gflops} GFLOPs).")
    return factory


for _name in VARIANTS:
    globals()[_name] = _factory(_name)
