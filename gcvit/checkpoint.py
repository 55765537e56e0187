"""Checkpoint loading: timm's layout as is, the official NVlabs/GCVit layout converted on load.

Official layout (NVlabs/GCVit ``models/gc_vit.py``) vs ours (timm's keys):

=============================================  ==========================================================
official                                       ours
=============================================  ==========================================================
patch_embed.proj                               stem.conv1
patch_embed.conv_down.{norm1,norm2,reduction}  stem.down.{norm1,norm2,reduction}
  ...conv.0 / conv.2.fc.0 / conv.2.fc.2 / conv.3   ...conv_block.conv_dw / se.fc1 / se.fc2 / conv_pw
levels.i.blocks.j.attn.relative_position_...   stages.i.blocks.j.attn.rel_pos.relative_position_bias_table
levels.i.blocks.j.gamma1 / gamma2              stages.i.blocks.j.ls1.gamma / ls2.gamma
levels.i.q_global_gen.to_q_global.k.conv.*     stages.i.global_block.blocks.conv{k+1}.*
levels.i.downsample.*  (end of level i)        stages.{i+1}.downsample.*  (start of the next stage)
norm / head                                    stages.{last}.norm / head.fc
=============================================  ==========================================================

SE layers are Linear in the official code and 1x1 convs here (same numbers, reshaped); the official
``relative_position_index`` buffers are recomputed, not loaded. Training checkpoints nest the weights under
``state_dict`` / ``state_dict_ema`` (or ``model`` / ``model_ema``), possibly with a DDP ``module.`` prefix.
"""
import argparse
import os
import re
from typing import Dict, Mapping

import torch

_MBCONV_PARTS = {"conv.0.weight": "conv_dw.weight", "conv.2.fc.0.weight": "se.fc1.weight",
                 "conv.2.fc.2.weight": "se.fc2.weight", "conv.3.weight": "conv_pw.weight"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the model is left unchanged."""


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a .pth / .pth.tar / .pt / .bin / .safetensors file and unnest the weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path, device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path!r} (truncated or not a checkpoint?): {exc}") from exc
    return unnest_state_dict(obj, use_ema=use_ema, source=path)


def unnest_state_dict(obj, use_ema: bool = False, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    order = ("state_dict_ema", "model_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
    for key in order:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    else:
        if use_ema:
            raise CheckpointError(f"{source} has no EMA weights (state_dict_ema / model_ema)")
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        state[k[len("module."):] if k.startswith("module.") else k] = v
    return state


def is_official_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("levels.", "patch_embed.")) for k in state)


def convert_official(state: Mapping[str, torch.Tensor], num_stages: int = 4) -> Dict[str, torch.Tensor]:
    """Rename an official NVlabs/GCVit state_dict to ours (timm's keys)."""
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        new = _convert_key(key, num_stages)
        if new.endswith(("se.fc1.weight", "se.fc2.weight")) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _mbconv(prefix: str, rest: str) -> str:
    return prefix + _MBCONV_PARTS.get(rest, rest)


def _convert_key(key: str, num_stages: int) -> str:
    if key.startswith("patch_embed.proj."):
        return "stem.conv1." + key[len("patch_embed.proj."):]
    m = re.match(r"patch_embed\.conv_down\.(.*)", key)
    if m:
        return _downsample("stem.down.", m.group(1))
    m = re.match(r"levels\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        m2 = re.match(r"blocks\.(\d+)\.(.*)", rest)
        if m2:
            tail = m2.group(2)
            tail = {"attn.relative_position_bias_table": "attn.rel_pos.relative_position_bias_table",
                    "gamma1": "ls1.gamma", "gamma2": "ls2.gamma"}.get(tail, tail)
            return f"stages.{i}.blocks.{m2.group(1)}.{tail}"
        m2 = re.match(r"q_global_gen\.to_q_global\.(\d+)\.(.*)", rest)
        if m2:
            return _mbconv(f"stages.{i}.global_block.blocks.conv{int(m2.group(1)) + 1}.", m2.group(2))
        if rest.startswith("downsample."):
            return _downsample(f"stages.{i + 1}.downsample.", rest[len("downsample."):])
    if key.startswith("norm."):
        return f"stages.{num_stages - 1}.norm." + key[len("norm."):]
    if key.startswith("head."):
        return "head.fc." + key[len("head."):]
    return key  # unknown keys are reported as unexpected by the caller


def _downsample(prefix: str, rest: str) -> str:
    return _mbconv(prefix + "conv_block.", rest) if rest.startswith("conv.") else prefix + rest


def _summarise(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Validate everything first, then load; on any mismatch raise one error and leave the model unchanged."""
    if is_official_layout(state):
        state = convert_official(state, num_stages=len(getattr(model, "stages", [])) or 4)
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in set(expected) & set(state) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model (was it saved from another variant, "
                              f"img_size or num_classes?); nothing was loaded. " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: torch.nn.Module, path: str, use_ema: bool = False) -> torch.nn.Module:
    """Load a timm-layout or official-layout checkpoint file into ``model``; all-or-nothing."""
    load_state_dict(model, read_state_dict(path, use_ema=use_ema), source=f"checkpoint {os.fspath(path)!r}")
    return model
