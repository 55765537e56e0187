"""Fused vs reference numerics of a whole model on the machine at hand (``python -m gcvit check``)."""
import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Dict, List

import torch

from . import dispatch

# Stated tolerances, relative to the largest magnitude of the reference quantity (fp32 on CPU or GPU).
# Gradients of deep variants accumulate more rounding than logits. fp64 (the interpreter tests): logits near
# exact; gradients carry fp32-level error because the attention ops save their logsumexp in fp32 by contract.
TOLERANCES = {torch.float64: (1e-10, 1e-6), torch.float32: (1e-4, 1e-3), torch.float16: (2e-2, 5e-2),
              torch.bfloat16: (5e-2, 1e-1)}


@dataclass
class CheckResult:
    logits_max_diff: float
    logits_tol: float
    worst_grad: str
    worst_grad_rel_diff: float
    grad_tol: float
    fused_warnings: List[str]

    @property
    def ok(self) -> bool:
        return self.logits_max_diff <= self.logits_tol and self.worst_grad_rel_diff <= self.grad_tol


def randomise_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Non-trivial weights (layer scales of 1e-5 and zero biases would hide wiring mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * std + base)
    return model


def compare(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> CheckResult:
    """Run ``model`` with the reference path and a fused copy; compare logits and every parameter gradient."""
    reference = model.set_fused(False)
    fused = copy.deepcopy(reference).set_fused(True)
    grads: Dict[str, Dict[str, torch.Tensor]] = {}
    outs = {}
    # this differentiates, and on the CPU dispatch would pick the reference for that: force the C++ kernels
    force_cpu = x.device.type == "cpu" and dispatch.forced_backend() is None
    with warnings.catch_warnings(record=True) as caught, \
            (dispatch.use_backend("cpu") if force_cpu else contextlib.nullcontext()):
        warnings.simplefilter("always")
        for tag, m in (("reference", reference), ("fused", fused)):
            m.zero_grad(set_to_none=True)
            out = m(x)
            out.float().pow(2).mean().backward()
            outs[tag] = out.detach().double()
            grads[tag] = {n: p.grad.detach().double() for n, p in m.named_parameters() if p.grad is not None}
    logits_tol_rel, grad_tol = TOLERANCES[dtype]
    scale = outs["reference"].abs().max().item()
    # a gradient that is zero in exact arithmetic (e.g. the bias of a one-token window) is compared with the
    # scale of the model's gradients, not with its own rounding noise
    floor = 1e-3 * max(g.abs().max().item() for g in grads["reference"].values())
    worst_name, worst = "", 0.0
    for name, g in grads["reference"].items():
        other = grads["fused"].get(name)
        diff = float("inf") if other is None else (g - other).abs().max().item() / max(g.abs().max().item(), floor)
        if diff > worst:
            worst_name, worst = name, diff
    messages = sorted({str(w.message) for w in caught if "gcvit: fused" in str(w.message)})
    return CheckResult((outs["reference"] - outs["fused"]).abs().max().item(), logits_tol_rel * max(scale, 1.0),
                       worst_name, worst, grad_tol, messages)
