"""The one place that decides, per call, between the fused kernels and the reference math.

A module with ``fused = False`` always runs the reference path (:mod:`gcvit.functional`). With
``fused = True`` the fused op runs when it supports the case: on CUDA the Triton kernels, on the CPU the
C++ kernels of ``csrc/`` (compiled on first use); anything else (no kernel for the device, an unsupported
head_dim or dtype, attention dropout in training, ...) runs the reference path with ONE warning per reason.

On the CPU the C++ kernels are forward kernels (their backward is PyTorch math that recomputes, measured
0.77x-0.9x of the reference's autograd), so a CPU forward that will be differentiated runs the reference math:
CPU inference is fused, CPU training stays as fast as the reference. ``use_backend("cpu")`` forces the C++
kernels in training too (used by the tests).

A bf16 or fp16 model in CPU inference on a CPU without native arithmetic for that dtype (no AVX512-BF16 / AMX,
where ATen emulates it about 10x slower than fp32) runs the fused fp32 path on fp32 copies of its weights and
rounds the output back (:func:`call_in_fp32_if_needed`): the same outputs within the dtype's tolerance, several
times faster.

``use_backend("triton")`` forces the Triton kernels also for CPU tensors: with ``TRITON_INTERPRET=1`` they
then run in Triton's interpreter, which is how the CPU-only CI checks the whole fused model.
"""
import contextlib
import importlib
import os
import threading
import warnings
import weakref
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import functional as ref

_warned = set()
_forced_backend: Optional[str] = None


def warn_once(what: str, reason: str) -> None:
    if (what, reason) not in _warned:
        _warned.add((what, reason))
        warnings.warn(f"gcvit: fused {what} not used ({reason}); running the reference path", stacklevel=3)


@contextlib.contextmanager
def use_backend(backend: Optional[str]):
    """Force a backend: "triton" runs the Triton kernels even on CPU tensors (interpreter), "cpu" the C++
    kernels even when the CPU forward will be differentiated; None = automatic."""
    global _forced_backend
    if backend not in (None, "triton", "cpu"):
        raise ValueError(f"unknown backend {backend!r}; expected None, 'triton' or 'cpu'")
    previous, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = previous


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend`, or None."""
    return _forced_backend


def _kernel_module(name: str):
    try:
        return importlib.import_module(f"gcvit_kernels.{name}"), None
    except Exception as exc:  # triton missing or broken: the reference path still works
        return None, f"gcvit_kernels.{name} could not be imported: {exc}"


class Fused(NamedTuple):
    """A fused op and its input check, or the reason there is none."""
    op: Optional[Callable]
    unsupported_reason: Optional[Callable]
    reason: Optional[str]


_OPS = (("window_attention", "window_attention"), ("mbconv", "fused_mbconv"), ("cpu", "linear_gelu"),
        ("cpu", "linear_residual_layernorm"), ("cpu", "mlp_residual"), ("cpu", "layer_norm"),
        ("cpu", "window_attention_inference"), ("cpu", "linear"))
# (module, op, device type, forced backend) -> Fused. Filled eagerly (prepare, or the first eager call) so that
# torch.compile traces only a dict lookup, never an import or a C++ build.
_resolved: Dict[Tuple[str, str, str, Optional[str]], Fused] = {}


def _resolve(module_name: str, op: str, device_type: str, forced: Optional[str]) -> Fused:
    module, reason = _kernel_module(module_name)
    if module is None:
        return Fused(None, None, reason)
    if forced == "triton":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return Fused(None, None, "Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        triton_op = getattr(module, f"{op}_triton", None)
        if triton_op is None:
            return Fused(None, None, f"{op} has no Triton kernel")
        return Fused(triton_op, module.unsupported_reason, None)
    if device_type == "cpu":
        cpu, reason = _kernel_module("cpu")
        if cpu is None:
            return Fused(None, None, reason)
        if not cpu.available():
            return Fused(None, None, f"the C++ CPU kernels are not available ({cpu.load_error()})")
    elif device_type != "cuda":
        return Fused(None, None, f"no fused kernel for device type {device_type!r}")
    return Fused(getattr(module, op), getattr(module, "unsupported_reason", None), None)


def _backend(module_name: str, op: str, device: torch.device) -> Fused:
    """The fused implementation of ``op`` on ``device``, or the reason there is none."""
    key = (module_name, op, device.type, _forced_backend if _forced_backend == "triton" else None)
    if key not in _resolved:
        _resolved[key] = _resolve(*key)
    return _resolved[key]


def prepare(device_types=("cpu", "cuda")) -> None:
    """Resolve the fused backends ahead of time (imports, the C++ build on first use ever, then cached)."""
    for device_type in device_types:
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        for module_name, op in _OPS:
            if module_name != "cpu" or device_type == "cpu":
                _backend(module_name, op, torch.device(device_type))


def _reference_is_faster(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """A CPU forward that autograd will differentiate: the reference's backward is the faster one there."""
    if x.device.type != "cpu" or _forced_backend is not None or not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _attention_before_projection(attn, x: torch.Tensor, global_query: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The fused attention of a normalised (B, H, W, C) map up to (not including) the output projection, in the
    map layout; None, after one warning, when there is no fused kernel for the case (run the reference then)."""
    fused = _backend("window_attention", "window_attention", x.device)
    reason = fused.reason
    if fused.op is not None and attn.training and attn.attn_drop.p > 0:
        reason = "attention dropout is not fused"
    if reason is not None:
        warn_once("window attention", reason)
        return None
    # CPU fp32 inference: the qkv projection without its bias, which the kernel adds as it loads q, k, v
    inference = _backend("cpu", "window_attention_inference", x.device).op if _cpu_fp32_inference(attn, x) else None
    qkv_bias = attn.qkv.bias if inference is not None else None
    # the projections are per token, so they run on the whole map and the kernel reads windows in place
    if inference is not None:
        qkv = _backend("cpu", "linear", x.device).op(x, attn.qkv.weight, None)
    else:
        qkv = attn.qkv(x)
    table = attn.rel_pos.relative_position_bias_table.to(qkv.dtype)
    if global_query is not None:  # one per image, tiny: make it the dense (B, wh, ww, C) the kernels index
        global_query = global_query.to(qkv.dtype).contiguous()
    reason = fused.unsupported_reason(qkv, table, attn.num_heads, attn.window_size, global_query)
    if reason is None:
        if inference is not None:
            return inference(qkv, qkv_bias, table, attn.num_heads, attn.window_size, global_query, attn.scale)
        return fused.op(qkv, table, attn.num_heads, attn.window_size, global_query, attn.scale)
    warn_once("window attention", reason)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    return ref.window_attention(qkv, table, attn.num_heads, attn.window_size, global_query, attn.scale)


def window_attention(attn, x: torch.Tensor, global_query: Optional[torch.Tensor]) -> torch.Tensor:
    """The attention of one block on a normalised (B, H, W, C) map; returns (B, H, W, C) after the projection."""
    if not attn.fused or _reference_is_faster(x, attn):
        return attn.forward_reference(x, global_query)
    out = _attention_before_projection(attn, x, global_query)
    if out is None:
        return attn.forward_reference(x, global_query)
    return attn.proj_drop(attn.proj(out))


def _fused_cpu_inference(module, x: torch.Tensor) -> bool:
    """A fused module's CPU call in eval mode with nothing to differentiate, no autocast, not forced to Triton."""
    return (module.fused and not module.training and x.device.type == "cpu" and _forced_backend != "triton"
            and _autocast_dtype(x.device) is None and not _reference_is_faster(x, module))


def _cpu_fp32_inference(module, x: torch.Tensor) -> bool:
    """Whether a call takes the CPU fp32 inference kernels (the block-level C++ ops, which have no backward)."""
    return x.dtype == torch.float32 and _fused_cpu_inference(module, x)


def _layer_norm_rows(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    op = _backend("cpu", "layer_norm", x.device).op
    if op is not None and norm.weight is not None:
        return op(x, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (a LayerNorm with a ``fused`` flag) over the last dim of x: the C++ row kernel in CPU fp32 inference
    with ``fused``, ``F.layer_norm`` everywhere else."""
    if _cpu_fp32_inference(norm, x):
        return _layer_norm_rows(norm, x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def transformer_block(blk, x: torch.Tensor, global_query: torch.Tensor) -> torch.Tensor:
    """One GC ViT block on a (B, H, W, C) map.

    CPU fp32 inference with ``fused``: LayerNorm and the fused attention, then the output projection, bias, layer
    scale, residual add and the second LayerNorm as ONE op (GEMM plus a single pass over each row), and the MLP
    with GELU, layer scale and residual as one op (row blocks kept in L2 where the weights are small).
    Everywhere else (training, other devices, dtypes, autocast): the block's modules one by one, each
    dispatching on its own."""
    if _cpu_fp32_inference(blk, x) and not blk.attn.training:  # so no attention dropout
        ops = [_backend(module, op, x.device).op for module, op in (
            ("window_attention", "window_attention"), ("cpu", "linear_residual_layernorm"), ("cpu", "mlp_residual"))]
        if all(op is not None for op in ops):
            _, linear_residual_layernorm, mlp_residual = ops
            attn, mlp = blk.attn, blk.mlp
            # never None here: the attention kernel exists and there is no attention dropout
            out = _attention_before_projection(attn, _layer_norm_rows(blk.norm1, x),
                                               global_query if attn.use_global else None)
            x, normed = linear_residual_layernorm(out, attn.proj.weight, attn.proj.bias, x,
                                                  getattr(blk.ls1, "gamma", None), blk.norm2.weight,
                                                  blk.norm2.bias, blk.norm2.eps)
            return mlp_residual(normed, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, x,
                                getattr(blk.ls2, "gamma", None))
    return blk.forward_per_module(x, global_query)


# the torch.cpu probes (private, so looked up defensively) that say a CPU computes the dtype natively
_NATIVE_HALF_PROBES = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                       torch.float16: ("_is_avx512_fp16_supported", "_is_amx_fp16_supported")}


def _cpu_computes_natively(dtype: torch.dtype) -> bool:
    for probe in _NATIVE_HALF_PROBES[dtype]:
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:  # the probe is missing in this torch: count it as "not native"
            pass
    return False


# functional_call swaps a model's tensors for the call: concurrent calls on one model take turns, else one call
# could restore the other's fp32 copies as the model's parameters
_fp32_call_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_fp32_call_locks_guard = threading.Lock()


def call_in_fp32_if_needed(model, x: torch.Tensor):
    """A fused model's CPU inference on a bf16/fp16 batch, when the CPU lacks native arithmetic for it and the
    model's parameters are all in that dtype: model(x) on fp32 copies of its parameters and buffers and an fp32 x,
    the output (a tensor or a list of them) rounded back to x's dtype. None when that does not apply (the caller
    then runs the model as it is).

    Concurrent calls on the same model are serialised, and the parameters' dtype is checked under the same lock:
    checked outside it, a call could see another call's fp32 copies in place and run the half-precision path on
    them."""
    if not (isinstance(x, torch.Tensor) and x.dtype in _NATIVE_HALF_PROBES and _fused_cpu_inference(model, x)):
        return None  # (a non-tensor goes on to the model's input check and its clear error)
    if _cpu_computes_natively(x.dtype):
        return None
    with _fp32_call_locks_guard:
        lock = _fp32_call_locks.setdefault(model, threading.Lock())
    with lock:
        if not all(p.dtype == x.dtype for p in model.parameters()):
            return None
        state = {name: t.float() if t.is_floating_point() else t
                 for name, t in list(model.named_parameters()) + list(model.named_buffers())}
        out = torch.func.functional_call(model, state, (x.float(),))
    return [t.to(x.dtype) for t in out] if isinstance(out, list) else out.to(x.dtype)


def inference_arena(model, x: torch.Tensor):
    """The context a fused model's forward runs in: on the CPU in inference, the C++ extension's caching arena
    (gcvit_kernels.cpu.inference_arena: the forward reuses the previous one's large blocks instead of faulting in
    fresh pages); otherwise nothing."""
    if (isinstance(x, torch.Tensor) and _fused_cpu_inference(model, x) and not torch.compiler.is_compiling()):
        cpu, _ = _kernel_module("cpu")
        if cpu is not None:
            return cpu.inference_arena()
    return contextlib.nullcontext()


def frozen_weights():
    """A context in which fused models' weights are constants (CPU inference with a fixed model): the C++ ops'
    tiled GEMMs pack each Linear and Fused-MBConv 1x1 weight once, on first use, instead of once a call, and free
    the packed copies when the outermost block exits (gcvit_kernels.cpu.frozen_weights, whose docstring states
    what is detected: in-place changes through the weight tensors are; writes through ``param.data`` are not).
    Without the C++ extension it does nothing.

        >>> with torch.inference_mode(), gcvit.frozen_weights():
        ...     for batch in loader:
        ...         logits = model(batch)
    """
    cpu, _ = _kernel_module("cpu")
    return cpu.frozen_weights() if cpu is not None else contextlib.nullcontext()


def keeps_channels_last(module, x: torch.Tensor) -> bool:
    """Whether the fused path keeps this NCHW map in channels-last memory: on the CPU its convolutions,
    channels-last LayerNorms and fused kernels then read it without the permute copies timm's NCHW layout costs."""
    return (module.fused and x.device.type == "cpu" and _forced_backend != "triton"
            and not _reference_is_faster(x, module))


def fused_mbconv(block, x: torch.Tensor) -> torch.Tensor:
    """One Fused-MBConv block on an NCHW (or channels-last) map."""
    weights = block.weights()
    if block.fused and not _reference_is_faster(x, block):
        fused = _backend("mbconv", "fused_mbconv", x.device)
        reason = fused.reason
        if fused.op is not None:
            dtype = _autocast_dtype(x.device)
            if dtype is not None:
                x, weights = x.to(dtype), tuple(w.to(dtype) for w in weights)
            reason = fused.unsupported_reason(x, *weights)
            if reason is None:
                return fused.op(x, *weights)
        warn_once("Fused-MBConv", reason)
    return ref.fused_mbconv(x, *weights)


def mlp(block, x: torch.Tensor) -> torch.Tensor:
    """The transformer MLP. On the CPU the fused path runs fc1 + exact GELU as one C++ op (GELU applied in
    place while the GEMM's output is hot in cache); elsewhere there is no fused kernel for it (a GPU runs
    cuBLAS plus one elementwise GELU), so the reference runs without a warning."""
    if block.fused and x.device.type == "cpu" and _forced_backend != "triton" and not _reference_is_faster(x, block):
        fused = _backend("cpu", "linear_gelu", x.device)
        if fused.op is not None:
            hidden = block.drop1(fused.op(x, block.fc1.weight, block.fc1.bias))
            return block.drop2(block.fc2(hidden))
    return block.forward_reference(x)
