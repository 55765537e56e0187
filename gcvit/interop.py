"""Fused kernels for models built by timm: ``patch_timm`` swaps them into a ``timm.create_model("gcvit_*")``
model in place (same parameters, same state_dict), ``unpatch_timm`` restores timm's own forward.

Only instance attributes are added (the class methods of timm stay untouched), so undoing is deleting them.
The patched modules go through :mod:`gcvit.dispatch` like gcvit's own, with timm's original code as the
reference path."""
import types

import torch.nn as nn

from . import dispatch
from .model import MbConvBlock

_PATCHED = "_gcvit_patched"


def _timm_classes():
    try:
        from timm.models import gcvit as timm_gcvit
    except ImportError as exc:  # pragma: no cover - timm is a test dependency
        raise ImportError("gcvit.patch_timm needs timm installed") from exc
    return timm_gcvit.GlobalContextVitBlock, timm_gcvit.MbConvBlock, timm_gcvit.GlobalContextVit


def _fused_window_attn(block, x, q_global):
    attn = block.attn
    return dispatch.window_attention(attn, x, q_global if attn.use_global else None)


def _fused_mbconv_forward(block, x):
    return dispatch.fused_mbconv(block, x)


def patch_timm(model: nn.Module) -> nn.Module:
    """Route a timm GC ViT's window attention and Fused-MBConv blocks through gcvit's fused kernels, in place."""
    block_cls, mbconv_cls, model_cls = _timm_classes()
    if not isinstance(model, model_cls):
        raise TypeError(f"patch_timm expects a timm GlobalContextVit (timm.create_model('gcvit_tiny')), "
                        f"got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, block_cls):
            attn = module.attn
            attn.fused = True
            # timm's own partition -> attention -> reverse is the reference path
            attn.forward_reference = types.MethodType(block_cls._window_attn, module)
            module._window_attn = types.MethodType(_fused_window_attn, module)
            setattr(module, _PATCHED, True)
        elif isinstance(module, mbconv_cls):
            module.fused = True
            module.weights = types.MethodType(MbConvBlock.weights, module)
            module.forward = types.MethodType(_fused_mbconv_forward, module)
            setattr(module, _PATCHED, True)
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm`: timm's own forward again."""
    for module in model.modules():
        if getattr(module, _PATCHED, False):
            for name in ("_window_attn", "forward", "weights", "fused", _PATCHED):
                module.__dict__.pop(name, None)
            if hasattr(module, "attn"):
                module.attn.__dict__.pop("fused", None)
                module.attn.__dict__.pop("forward_reference", None)
    return model
