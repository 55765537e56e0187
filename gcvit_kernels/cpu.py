"""C++ CPU kernels for GC ViT's fused ops (csrc/gcvit_cpu.cpp), registered as the "cpu" kernels of the
custom ops that gcvit_kernels.window_attention and gcvit_kernels.mbconv define.

Build: ``torch.utils.cpp_extension.load`` with ninja, on first use, into a stable cache directory
(``$GCVIT_EXT_DIR`` or ``~/.cache/gcvit/torch_extensions/<torch>-<python>/<variant>``); torch's
extension loader rebuilds only when the sources or flags change, and a file lock keeps concurrent
processes from building twice. Flags: ``-O3 -fopenmp`` (ATen's parallel_for is inline OpenMP: without it every kernel runs on one thread;
the libgomp it links is the one torch has already loaded) and no ``-march=native``. The variant is picked at
run time from ``torch.backends.cpu.get_cpu_capability()``: an ``avx512`` build (ATen's AVX512 flags,
16-lane ``at::vec``) on CPUs ATen runs at AVX512, an ``avx2`` build (``-mavx2 -mfma -mf16c``) on AVX2 CPUs, a
generic ``default`` build otherwise; each variant has its own cache directory, so a cache shared between
machines never runs instructions a CPU lacks. ``GCVIT_EXT_VARIANT=avx2|default`` forces a narrower one.

``load()`` never raises: without a compiler or on a build failure it emits one warning and
``available()`` is False; the CPU kernels of the ops then run the PyTorch reference math.

Ops given CPU kernels here (schemas defined by the Triton op modules):

* ``gcvit::window_attention_fwd`` -- C++ (fp32, bf16; other dtypes: PyTorch math).
  Per (window, head group) task: Q (scaled), K^T (8x8 register transposes), V packed from the qkv map into a
  per-thread, 64-byte aligned fp32 tile (the next task's qkv prefetched a few tokens per strip), register-blocked
  Q K^T with the accumulators started from the relative-position bias (gathered from the table into a
  (heads, N, Np) array, kept by the table's contents for the next call, up to 64 MiB; tasks run head-group-major
  with groups sized so a thread's bias stays in L2)
  with the row maxima taken in its epilogue, softmax in log2 units (a degree-6 exp2), P V, written straight
  into the (B, H, W, C) output; lse saved for the backward.
* ``gcvit::window_attention_bwd`` -- PyTorch math from the saved lse (flash-attention style
  recompute of P, one batched pass; deterministic).
* ``gcvit::fused_mbconv_fwd`` -- C++ depthwise 3x3 + exact GELU + SE pool partial sums in one pass
  (NCHW and channels_last), SE gate in fp32, gate folded into the 1x1 weights per image (into t on maps with
  H W < C). fp32 channels_last with whole vectors of channels: our register-blocked 1x1 pass starting from the
  residual, and, with an image per thread and an image's t within a core's L2, one task per image through
  every step (t never leaves the core); at C = 512 (H W < C) one GEMM over every image's gated t, on oneDNN
  AVX-512 builds the tiled GEMM below from the residual; NCHW fp32 maps with H W < C go through the channels_last
  kernel (converted in and out); otherwise (bf16, ragged C) one GEMM of the GEMM backend (below) or MKL's batched
  GEMM with the residual as its beta=1 input.
* ``gcvit::fused_mbconv_bwd`` -- explicit PyTorch math (recompute from the inputs).

Ops defined here (CPU only, no Triton kernel: a GPU runs cuBLAS and one elementwise op for each):

* ``gcvit::window_attention_inference`` -- the attention of a CPU fp32 inference block on a qkv map that lacks
  its projection's bias: the kernel adds the bias as it loads q, k, v (so the projection runs as a plain GEMM, no
  bias copied into its (tokens, 3C) output first) and keeps no lse. 1.037x the whole model.
* ``gcvit::linear``, ``gcvit::linear_gelu``, ``gcvit::linear_residual_layernorm``, ``gcvit::mlp_residual`` --
  the GEMMs next to attention, with their epilogues fused (inference ops; a differentiated call runs PyTorch
  math): the qkv projection; fc1 + exact GELU; output projection + bias + layer scale + residual + the block's
  second LayerNorm in one row pass; the whole MLP half of a block, in L2-sized row blocks (one single-threaded
  GEMM per block) where the weights are small.
* GEMM backend (:func:`gemm_backend`): every GEMM of these ops (and of Fused-MBConv's GEMM paths) runs on MKL's
  BLAS ``sgemm`` (what ``torch.mm`` runs) or on the oneDNN inside libtorch (``mkldnn::_linear_pointwise`` where
  the GEMM allocates its output, ``at::native::mkldnn_matmul`` where it writes into ours), all found at run time.
  MKL runs its AVX-512 kernels only on Intel CPUs; on the AMD EPYC (Zen 5) of 2026-12-02 its sgemm ran
  gcvit_tiny's GEMMs at 112-185 GFLOP/s against oneDNN's 194-352 (2 threads, fp32, batch 8), and the fused model
  ran 1.65x faster on oneDNN (in-process A/B; 1.43x before the qkv projection became gcvit::linear). Default: MKL
  on Intel, oneDNN elsewhere on x86; ``GCVIT_CPU_GEMM=blas|onednn`` or :func:`set_gemm_backend` forces one.
  On the oneDNN backend of an AVX-512 build, Linear layers with N a whole number of vectors run instead on the
  extension's register-tiled GEMM (the one of Fused-MBConv's 1x1 conv; weights beyond 768 KiB, the 7^2 stage's, in
  column groups that each fit a core's L2), which measured 1.0-1.26x oneDNN's at gcvit_tiny's shapes (AMD EPYC
  Zen 4), and the MLP blocks then run on it too (1.21x at 56^2).
* ``inference_arena()`` -- not an op: a caching CPU allocator (in the extension) that a fused model's CPU
  inference forward allocates from, so each forward reuses the previous one's pages instead of faulting in
  fresh ones (gcvit_tiny b8: 22,600 minor faults per forward -> 0, 1.026-1.045x the model).
* ``frozen_weights()`` -- not an op: a scope in which the tiled GEMMs keep each weight's packed panels between
  calls (checked against the weight tensor's version counter), so a model's forwards pack each weight once
  (gcvit_tiny 1.14x at batch 1, 1.05x at batch 8, AMD EPYC Zen 4).
* ``gcvit::layer_norm`` -- LayerNorm over the last dim, one vectorised pass per row (the norms no GEMM
  precedes: the blocks' first norm, the stem's and downsamplers' channels-last LayerNorm2d). 1.5x ATen's at
  the 112^2 and 56^2 maps, equal at 14^2; about 1% of the whole fused model (interleaved A/B runs of the
  model: 0.97x, 1.013x, 1.017x; 1.02-1.04x for a prototype called without the custom-op layer).

Measurements: ``benchmarks/results/cpu-2core-2026-12-02-ops.json`` (``pytest benchmarks/test_bench_cpu.py
--benchmark-only``), on this workplace's 2-core Intel Xeon (AVX-512, AVX512-BF16, AMX; the avx512 build), fp32,
batch 8, gcvit_tiny shapes, 2026-12-02 00:55 UTC at fb6c864. Ratio = reference time / C++ time, wall clock at 2
threads, the median of 25 interleaved rounds' ratios. This VM's speed drifts by up to 2x over minutes; the
in-process A/B of two builds (alternating call by call) that the commit messages quote is steadier:

* window attention vs the reference subgraph / vs SDPA with the bias as a mask: stage 1 (56^2, 7x7) 2.9-3.0x /
  1.9-2.1x; stage 2 (28^2, 7x7) 2.5x / 1.8-1.9x; stage 3 (14^2, 14x14) 2.2-2.3x / 1.6-1.7x; stage 4 (7^2, 7x7)
  2.0x (local) and 2.2x (global) / 1.5-1.8x. The goals (>= 2x reference, >= 1.3x SDPA) hold at every stage, stage 4
  local at the line (1.86x in a run an hour earlier). Inside the model the kernel is 17-20% of the fused forward
  (replacing it by a free stand-in).
* Fused-MBConv (channels_last, as the model feeds it): 1.7-2.4x at C = 64 and 128, 1.48x at 14^2 x 256 and 1.41x
  at 7^2 x 512 (whose 1x1 stays on MKL), so 1.5x holds at 6 of the 8 shapes.
* mlp_residual 1.57x / 1.08x at stages 1-2 (row blocks), 1.04-1.05x at stages 3-4; linear_residual_layernorm
  1.31x / 1.17x at stages 1-2, 1.00-1.04x at 3-4; linear_gelu 0.96-1.02x (the GEMMs dominate there).
* On an AMD EPYC (Zen 5, AVX-512; GEMMs on oneDNN), 2026-12-02 at d0519c3 (``cpu-2core-2026-12-02-amd-ops.json``):
  attention 2.7-3.8x / 2.8-3.8x at all four stages; Fused-MBConv channels-last 1.37-3.1x (below 1.5x at 56^2 x
  64, 28^2 x 128, 14^2 x 256 and 7^2 x 512 in wall clock; 1.77-3.9x in single-thread CPU time); the block
  epilogue ops 1.5-2.1x (their GEMMs on oneDNN, the reference's on MKL).
* The session before, at 7e4ba32 (``cpu-2core-2026-12-01-ops.json``, 5 rounds): attention 2.0-2.8x at stages 1-3
  and 1.6-1.9x at stage 4, MBConv 1.18-1.89x.
* Earlier, on AMD EPYC (AVX2; ``cpu-2core-2026-11-25-ops.json``): attention 2.3-3.1x / 1.6-2.7x at stages 1-3,
  1.6-2.2x at stage 4; MBConv 1.08-1.99x.
* Whole model: see the README.
* Training: the backward ops are PyTorch math, slower than the reference's autograd (earlier session, 1-thread
  CPU time: attention 0.77-0.88x, MBConv ~0.9x), so CPU training runs the reference path (gcvit/dispatch.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC_CANDIDATES = (
    os.path.join(os.path.dirname(_HERE), "csrc"),  # source checkout
    os.path.join(_HERE, "csrc"),  # installed package_data
)
_SOURCES = ("gcvit_cpu.cpp",)

_lock = threading.Lock()
_ext = None
_tried = False
_error: Optional[str] = None

# build variants, narrowest first: (name, ATen capability it needs, compiler flags)
_VARIANTS = (
    ("default", "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]),
    ("avx2", "AVX2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    # the flags ATen builds its own AVX512 kernels with (at::vec's 16-lane Vectorized<float>)
    ("avx512", "AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
)


def _variant() -> Tuple[str, list]:
    """The widest build the running CPU supports, or a narrower one forced by ``GCVIT_EXT_VARIANT``."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if not sys.platform.startswith("linux"):
        cap = "DEFAULT"
    names = [v[0] for v in _VARIANTS]
    best = max((i for i, v in enumerate(_VARIANTS) if v[1] == cap), default=0)
    forced = os.environ.get("GCVIT_EXT_VARIANT", "").lower()
    if forced in ("", "auto"):
        pick = best
    elif forced in names and names.index(forced) <= best:
        pick = names.index(forced)  # a narrower build, for testing and A/B timing
    else:
        pick = best
        warnings.warn(f"gcvit: GCVIT_EXT_VARIANT={forced!r} ignored: this CPU supports {names[: best + 1]}",
                      RuntimeWarning)
    return _VARIANTS[pick][0], list(_VARIANTS[pick][2])


def build_directory() -> str:
    """The stable directory the extension is built and cached in."""
    variant, _ = _variant()
    root = os.environ.get("GCVIT_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gcvit", "torch_extensions"
    )
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, tag, variant)


def _sources() -> Optional[list]:
    for d in _CSRC_CANDIDATES:
        paths = [os.path.join(d, s) for s in _SOURCES]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None


def load():
    """Build (first time) or load the cached extension; returns the module or None. Never raises."""
    global _ext, _tried, _error
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            if os.environ.get("GCVIT_DISABLE_CPU_EXT", "") not in ("", "0"):
                raise RuntimeError("disabled by GCVIT_DISABLE_CPU_EXT")
            srcs = _sources()
            if srcs is None:
                raise RuntimeError(f"C++ sources {_SOURCES} not found next to the package")
            from torch.utils.cpp_extension import load as _cpp_load

            variant, flags = _variant()
            build_dir = build_directory()
            os.makedirs(build_dir, exist_ok=True)
            if not hasattr(torch.ops.gcvit_cpu, "window_attention_fwd"):
                _cpp_load(
                    name=f"gcvit_cpu_{variant}",
                    sources=srcs,
                    # at::parallel_for is OpenMP inlined into this library: without -fopenmp it runs serially
                    extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"],
                    build_directory=build_dir,
                    is_python_module=False,  # TORCH_LIBRARY(gcvit_cpu, ...) ops, loaded into torch.ops
                    verbose=os.environ.get("GCVIT_EXT_VERBOSE", "") not in ("", "0"),
                )
            _ext = torch.ops.gcvit_cpu
            _ext.vec_size()  # the library answers
            _apply_gemm_env(_ext)
        except Exception as e:  # compiler missing, build failure, ...
            _ext = None
            _error = f"{type(e).__name__}: {e}"
            msg = _error if len(_error) < 2000 else _error[:2000] + " ..."
            warnings.warn(
                "gcvit: the C++ CPU kernels could not be built or loaded; CPU ops use the PyTorch reference "
                f"math instead. Reason: {msg}",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            _tried = True
    return _ext


GEMM_BACKENDS = ("blas", "onednn")


def _apply_gemm_env(ext) -> None:
    forced = os.environ.get("GCVIT_CPU_GEMM", "").strip().lower()
    if forced in ("", "auto"):
        return
    try:
        ext.set_gemm_backend(forced)  # raises for an unknown name or a library this torch lacks
    except Exception as e:
        warnings.warn(f"gcvit: GCVIT_CPU_GEMM={forced!r} ignored ({e}); using {ext.gemm_backend()!r}", RuntimeWarning)


def gemm_backend() -> Optional[str]:
    """The library the C++ ops' GEMMs run on: ``"blas"`` (MKL's sgemm, as ``torch.mm``) or ``"onednn"`` (the
    oneDNN inside libtorch); None without the extension.

    Default: ``blas`` on Intel CPUs, ``onednn`` on others (MKL takes a slower code path off Intel: on an AMD EPYC
    Zen 5 its sgemm ran gcvit_tiny's GEMMs at about half oneDNN's speed). ``GCVIT_CPU_GEMM=blas|onednn`` or
    :func:`set_gemm_backend` forces one."""
    ext = load()
    return ext.gemm_backend() if ext is not None else None


def set_gemm_backend(name: str) -> None:
    """Run the C++ ops' GEMMs on ``name`` (one of :data:`GEMM_BACKENDS`) from now on, process-wide.
    Raises ValueError for another name, RuntimeError when this torch lacks that library or without the extension."""
    if name not in GEMM_BACKENDS:
        raise ValueError(f"set_gemm_backend: one of {GEMM_BACKENDS} expected, got {name!r}")
    ext = load()
    if ext is None:
        raise RuntimeError(f"set_gemm_backend: the C++ CPU extension is not available ({load_error()})")
    ext.set_gemm_backend(name)


_arena_limit_mb: Optional[int] = None


def _arena_limit() -> int:
    """GCVIT_CPU_ARENA_MB, read once: how many MiB of freed blocks the inference arena keeps (0: no arena)."""
    global _arena_limit_mb
    if _arena_limit_mb is None:
        raw = os.environ.get("GCVIT_CPU_ARENA_MB", "").strip() or "1024"
        try:
            limit = int(raw)
        except ValueError:
            raise ValueError(f"GCVIT_CPU_ARENA_MB must be a whole number of MiB (0 turns the arena off), got {raw!r}")
        _arena_limit_mb = max(limit, 0)
        load().arena_set_limit(_arena_limit_mb << 20)
    return _arena_limit_mb


@contextlib.contextmanager
def inference_arena():
    """Allocate CPU tensors from the extension's caching arena while the block runs (a fused model's CPU inference
    forward): each forward then reuses the previous one's large blocks instead of faulting in fresh pages.

    The arena keeps freed blocks of 64 KiB and more, up to ``GCVIT_CPU_ARENA_MB`` MiB (default 1024; 0 turns the
    arena off); :func:`arena_empty_cache` returns them to the system. Without the extension this does nothing."""
    ext = load()
    entered = ext is not None and _arena_limit() > 0 and ext.arena_enter()
    try:
        yield
    finally:
        if entered:
            ext.arena_exit()


@contextlib.contextmanager
def frozen_weights():
    """Treat the weights the C++ ops are given as constants while the block runs (inference with a fixed model):
    each Linear and Fused-MBConv 1x1 weight the tiled GEMMs pack into their panel layout is packed once, on first
    use, and reused by every later call inside the block instead of packed again each call (gcvit_tiny batch 1
    1.14x, batch 8 1.05x on a 2-core AMD EPYC Zen 4). Scopes nest; the packed copies (about the size of those
    weights) are freed when the outermost one exits. Without the extension, or where the GEMMs are not tiled (the
    BLAS backend), this changes nothing.

    A weight changed through its own tensor (an in-place op, ``copy_``, ``load_state_dict``, a new Parameter) is
    detected and packed again. Writes that bypass a tensor's version counter (``param.data.copy_(...)``, a numpy
    view) are not: do not make them inside the block. Weights that are inference tensors (created under
    ``torch.inference_mode``) have no version counter and are packed every call, as outside the block."""
    ext = load()
    if ext is not None:
        ext.frozen_weights_enter()
    try:
        yield
    finally:
        if ext is not None:
            ext.frozen_weights_exit()


def frozen_weights_bytes() -> int:
    """Bytes of packed weights :func:`frozen_weights` keeps now (0 without the extension or outside the block)."""
    ext = load()
    return ext.frozen_weights_bytes() if ext is not None else 0


def arena_cached_bytes() -> int:
    """Bytes the inference arena holds for reuse (0 without the extension)."""
    ext = load()
    return ext.arena_cached_bytes() if ext is not None else 0


def arena_empty_cache() -> None:
    """Return the extension's cached memory to the system: the inference arena's free blocks and the attention
    kernel's built biases (tensors in use are not affected)."""
    ext = load()
    if ext is not None:
        ext.arena_empty_cache()


def available() -> bool:
    """True when the C++ CPU extension is built and loaded (builds it on first call)."""
    return load() is not None


def load_error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _error


# ------------------------------------------------------------------------------------------------
# Argument checks (clear Python errors before anything reaches C++)
# ------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _check_attention_args(qkv, table, global_query, num_heads, window_h, window_w) -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4:
        raise ValueError(f"qkv must be a 4-D (B, H, W, S*C) tensor, got {getattr(qkv, 'shape', type(qkv))}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating point tensor, got {qkv.dtype}")
    if num_heads <= 0 or window_h <= 0 or window_w <= 0:
        raise ValueError(f"num_heads, window_h, window_w must be positive, got {num_heads}, {window_h}, {window_w}")
    b, h, w, sc = qkv.shape
    s = 2 if global_query is not None else 3
    if sc % (s * num_heads) != 0:
        raise ValueError(f"qkv's last dim {sc} is not divisible by S*num_heads = {s}*{num_heads}")
    if h % window_h or w % window_w:
        raise ValueError(f"map {h}x{w} is not divisible by the window {window_h}x{window_w}")
    if qkv.stride(-1) != 1:
        raise ValueError("qkv's last dim must have stride 1")
    n_tab = (2 * window_h - 1) * (2 * window_w - 1)
    if table.dim() != 2 or tuple(table.shape) != (n_tab, num_heads):
        raise ValueError(f"rel_pos_bias_table must be ({n_tab}, {num_heads}), got {tuple(table.shape)}")
    if table.device != qkv.device:
        raise ValueError(f"rel_pos_bias_table is on {table.device} but qkv is on {qkv.device}")
    if global_query is not None:
        c, n = sc // s, window_h * window_w
        g = global_query.shape[0] if global_query.dim() > 0 else 0
        ok_shape = tuple(global_query.shape) in ((g, window_h, window_w, c), (g, n, c))
        if not ok_shape or g == 0:
            raise ValueError(f"global_query must be (G, {window_h}, {window_w}, {c}) or (G, {n}, {c}), "
                             f"got {tuple(global_query.shape)}")
        t = b * (h // window_h) * (w // window_w)
        if t % g:
            raise ValueError(f"{t} windows are not divisible by G = {g} global queries")
        if global_query.dtype != qkv.dtype:
            raise TypeError(f"global_query dtype {global_query.dtype} differs from qkv dtype {qkv.dtype}")
        if global_query.device != qkv.device:
            raise ValueError(f"global_query is on {global_query.device} but qkv is on {qkv.device}")


def _check_mbconv_args(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    c = x.shape[1]
    if tuple(dw_weight.shape) != (c, 1, 3, 3):
        raise ValueError(f"dw_weight must be ({c}, 1, 3, 3), got {tuple(dw_weight.shape)}")
    if se_reduce_weight.dim() != 4 or se_reduce_weight.shape[1:] != (c, 1, 1) or se_reduce_weight.shape[0] < 1:
        raise ValueError(f"se_reduce_weight must be (C_rd, {c}, 1, 1), got {tuple(se_reduce_weight.shape)}")
    rd = se_reduce_weight.shape[0]
    if tuple(se_expand_weight.shape) != (c, rd, 1, 1):
        raise ValueError(f"se_expand_weight must be ({c}, {rd}, 1, 1), got {tuple(se_expand_weight.shape)}")
    if tuple(pw_weight.shape) != (c, c, 1, 1):
        raise ValueError(f"pw_weight must be ({c}, {c}, 1, 1), got {tuple(pw_weight.shape)}")
    for name, t in (("dw_weight", dw_weight), ("se_reduce_weight", se_reduce_weight),
                    ("se_expand_weight", se_expand_weight), ("pw_weight", pw_weight)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Window attention: CPU kernels of gcvit::window_attention_fwd / _bwd
# ------------------------------------------------------------------------------------------------

def _split_windows(qkv, global_query, num_heads, window_h, window_w, dtype):
    """q (T or G, 1, heads, n, d) grouped per global query, k, v (G', T/G', heads, n, d)."""
    from gcvit import functional as ref

    b, h, w, sc = qkv.shape
    s = 2 if global_query is not None else 3
    c = sc // s
    d = c // num_heads
    n = window_h * window_w
    win = ref.window_partition(qkv.to(dtype), (window_h, window_w))  # (T, n, S*C)
    t = win.shape[0]
    parts = win.view(t, n, s, num_heads, d).permute(2, 0, 3, 1, 4)  # (S, T, heads, n, d)
    if global_query is not None:
        g = global_query.shape[0]
        k, v = parts.unbind(0)
        q = global_query.to(dtype).reshape(g, n, num_heads, d).permute(0, 2, 1, 3).unsqueeze(1)
        k, v = k.reshape(g, t // g, num_heads, n, d), v.reshape(g, t // g, num_heads, n, d)
    else:
        q, k, v = (p.unsqueeze(0) for p in parts.unbind(0))  # (1, T, heads, n, d)
    return q, k, v, t, n, c, d


def _bias(table, window_h, window_w, dtype):
    from gcvit import functional as ref

    index = ref.relative_position_index((window_h, window_w), device=table.device)
    return ref.relative_position_bias(table.to(dtype), index), index  # (heads, n, n)


def _attention_fwd_torch(qkv, table, global_query, num_heads, window_h, window_w, scale):
    from gcvit import functional as ref

    ct = _compute_dtype(qkv.dtype)
    q, k, v, t, n, c, d = _split_windows(qkv, global_query, num_heads, window_h, window_w, ct)
    bias, _ = _bias(table, window_h, window_w, ct)
    s = (q * scale) @ k.transpose(-2, -1) + bias
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse.unsqueeze(-1)) @ v  # (G, T/G, heads, n, d)
    o = o.reshape(t, num_heads, n, d).transpose(1, 2).reshape(t, n, c)
    out = ref.window_reverse(o, (window_h, window_w), qkv.shape[1:3]).to(qkv.dtype).contiguous()
    return out, lse.reshape(t, num_heads, n).float()


def _attention_fwd_cpu(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale, qkv_bias=None,
                       need_lse=True):
    """(out, lse) of window attention on qkv + qkv_bias (the projection's bias, when qkv lacks it): the C++ kernel
    for fp32 and bf16 (with a bias, fp32 only; without need_lse its lse is empty), the PyTorch math otherwise."""
    _check_attention_args(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w)
    if qkv_bias is not None and (tuple(qkv_bias.shape) != (qkv.shape[-1],) or qkv_bias.device != qkv.device):
        raise ValueError(f"qkv_bias must be ({qkv.shape[-1]},) on {qkv.device}, got {tuple(qkv_bias.shape)} on "
                         f"{qkv_bias.device}")
    ext = load()
    kernel_bias = qkv_bias is None or (qkv.dtype == torch.float32 and qkv_bias.dtype == torch.float32)
    if ext is not None and qkv.dtype in _KERNEL_DTYPES and kernel_bias:
        gq = None if global_query is None else global_query.to(qkv.dtype)
        bias = None if qkv_bias is None else qkv_bias.contiguous()
        return ext.window_attention_fwd(qkv, rel_pos_bias_table, gq, num_heads, window_h, window_w, float(scale),
                                        bias, need_lse)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias.to(qkv.dtype)
    return _attention_fwd_torch(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale)


def _cpu_op(name: str, fn):
    """fn as the CPU custom op gcvit::<name>, whose schema comes from fn's annotations. In eager inference the
    public functions below call fn itself (see _eager); torch.compile and export trace the op."""
    return torch.library.custom_op(f"gcvit::{name}", mutates_args=(), device_types="cpu")(fn)


def _eager(x: torch.Tensor) -> bool:
    """Whether a call on x may skip the custom op's dispatch for its CPU implementation: a plain tensor outside
    torch.compile and export tracing. The dispatch costs about 20 us a call, 3-4% of a batch-1 gcvit_tiny forward
    (160-odd calls). Autograd still goes through the ops (their callers check)."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def _window_attention_inference_cpu(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor],
                                    rel_pos_bias_table: torch.Tensor, global_query: Optional[torch.Tensor],
                                    num_heads: int, window_h: int, window_w: int, scale: float) -> torch.Tensor:
    return _attention_fwd_cpu(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w, scale, qkv_bias,
                              need_lse=False)[0]


_window_attention_inference_op = _cpu_op("window_attention_inference", _window_attention_inference_cpu)


@_window_attention_inference_op.register_fake
def _window_attention_inference_fake(qkv, qkv_bias, rel_pos_bias_table, global_query, num_heads, window_h, window_w,
                                     scale):
    return qkv.new_empty((*qkv.shape[:3], qkv.shape[-1] // (2 if global_query is not None else 3)))


def window_attention_inference(qkv, qkv_bias, rel_pos_bias_table, num_heads, window_size, global_query=None,
                               scale=None):
    """Inference window attention (no backward, no lse) on a qkv map that lacks its projection's bias:
    ``window_attention(qkv + qkv_bias, ...)``, with the bias added as the kernel loads q, k and v, so the qkv
    projection runs as a plain GEMM (no bias copied into its output first). qkv (B, H, W, S*C), qkv_bias (S*C,)
    or None; the rest as ``gcvit_kernels.window_attention.window_attention``. fp32 CPU tensors run the C++
    kernel, anything else the PyTorch math."""
    window_h, window_w = window_size
    if scale is None:
        scale = (qkv.shape[-1] // (2 if global_query is not None else 3) // num_heads) ** -0.5
    op = _window_attention_inference_cpu if _eager(qkv) else torch.ops.gcvit.window_attention_inference
    return op(qkv, qkv_bias, rel_pos_bias_table, global_query, num_heads, window_h, window_w, float(scale))


def _attention_bwd_cpu(grad_out, qkv, rel_pos_bias_table, global_query, out, lse, num_heads, window_h, window_w,
                       scale, deterministic):
    """PyTorch math, recomputing the softmax from the inputs (exact in the compute dtype; deterministic)."""
    from gcvit import functional as ref

    _check_attention_args(qkv, rel_pos_bias_table, global_query, num_heads, window_h, window_w)
    if grad_out.shape[:3] != qkv.shape[:3] or out.shape != grad_out.shape:
        raise ValueError(f"grad_out/out must be (B, H, W, C) matching qkv, got {tuple(grad_out.shape)}, "
                         f"{tuple(out.shape)} for qkv {tuple(qkv.shape)}")
    ct = _compute_dtype(qkv.dtype)
    q, k, v, t, n, c, d = _split_windows(qkv, global_query, num_heads, window_h, window_w, ct)
    bias, index = _bias(rel_pos_bias_table, window_h, window_w, ct)
    qs = q * scale
    p = torch.softmax(qs @ k.transpose(-2, -1) + bias, dim=-1)  # (G, T/G, heads, n, n)
    shape5 = k.shape  # (G', T/G', heads, n, d)

    def to_heads(x):
        x = ref.window_partition(x.to(ct), (window_h, window_w))  # (T, n, C)
        return x.view(t, n, num_heads, d).transpose(1, 2).reshape(shape5)

    go = to_heads(grad_out)
    # D_i = rowsum(dO * O) per head, computed in the map layout (no partition copy of out)
    dsum = (grad_out.to(ct) * out.to(ct)).view(*out.shape[:3], num_heads, d).sum(-1)  # (B, H, W, heads)
    dsum = ref.window_partition(dsum, (window_h, window_w)).transpose(1, 2).reshape(*shape5[:-1], 1)
    dv = p.transpose(-2, -1) @ go
    dp = go @ v.transpose(-2, -1)
    ds = p * (dp - dsum)
    dq = (ds @ k) * scale  # (G', T/G', heads, n, d)
    dk = ds.transpose(-2, -1) @ qs
    dbias = ds.sum((0, 1))  # (heads, n, n)
    grad_table = torch.zeros(rel_pos_bias_table.shape, dtype=ct, device=qkv.device)
    grad_table.index_add_(0, index.reshape(-1), dbias.permute(1, 2, 0).reshape(n * n, num_heads))
    grad_table = grad_table.to(rel_pos_bias_table.dtype)

    s_count = 2 if global_query is not None else 3
    # window-layout gradient (T, n, S, heads, d), each part written once with a strided copy
    grad_win = torch.empty(t, n, s_count, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    parts = (dk, dv) if global_query is not None else (dq, dk, dv)
    for i, part in enumerate(parts):
        grad_win[:, :, i].copy_(part.reshape(t, num_heads, n, d).transpose(1, 2))
    if global_query is not None:
        grad_gq = dq.sum(1).permute(0, 2, 1, 3).reshape(global_query.shape).to(global_query.dtype)
    else:
        grad_gq = qkv.new_empty(0)
    grad_qkv = ref.window_reverse(grad_win.view(t, n, s_count * c), (window_h, window_w), qkv.shape[1:3])
    return grad_qkv, grad_table, grad_gq


# ------------------------------------------------------------------------------------------------
# Fused-MBConv: CPU kernels of gcvit::fused_mbconv_fwd / _bwd
# ------------------------------------------------------------------------------------------------

def _mbconv_fwd_cpu(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
    from gcvit import functional as ref

    _check_mbconv_args(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
    ext = load()
    if ext is not None and x.dtype in _KERNEL_DTYPES:
        ws = tuple(w if w.dtype == x.dtype else w.to(x.dtype)  # (Tensor.to costs ~2 us a call even as a no-op)
                   for w in (dw_weight, se_reduce_weight, se_expand_weight, pw_weight))
        return ext.fused_mbconv_fwd(x, *ws)
    ct = _compute_dtype(x.dtype)
    ws = tuple(w.to(ct) for w in (dw_weight, se_reduce_weight, se_expand_weight, pw_weight))
    return ref.fused_mbconv(x.to(ct), *ws).to(x.dtype)


def _gelu_grad(z):
    return 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def _mbconv_bwd_cpu(grad_out, x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight):
    """Explicit PyTorch math, recomputing the forward from the inputs (fp32, fp64 for fp64 inputs)."""
    _check_mbconv_args(x, dw_weight, se_reduce_weight, se_expand_weight, pw_weight)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    ct = _compute_dtype(x.dtype)
    b, c, h, w = x.shape
    rd = se_reduce_weight.shape[0]
    xf, gy = x.to(ct), grad_out.to(ct)
    dw = dw_weight.to(ct)
    w1 = se_reduce_weight.to(ct).reshape(rd, c)
    w2 = se_expand_weight.to(ct).reshape(c, rd)
    wp = pw_weight.to(ct).reshape(c, c)
    a = F.conv2d(xf, dw, padding=1, groups=c)

    def rows(v):  # (B, C, H, W) -> (B, HW, C); a view for channels_last tensors
        return v.permute(0, 2, 3, 1).reshape(b, h * w, c)

    a_r = rows(a)
    t_r = F.gelu(a_r)
    m = t_r.mean(1)  # (B, C)
    z = m @ w1.t()
    r = F.gelu(z)
    gate = torch.sigmoid(r @ w2.t())  # (B, C)
    gy_r = rows(gy)
    ts_r = t_r * gate[:, None, :]
    grad_pw = gy_r.reshape(-1, c).t() @ ts_r.reshape(-1, c)  # y = ts @ pw^T
    g_ts = gy_r @ wp  # (B, HW, C)
    g_gate = (g_ts * t_r).sum(1)
    g_u = g_gate * gate * (1 - gate)
    grad_w2 = g_u.t() @ r
    g_z = (g_u @ w2) * _gelu_grad(z)
    grad_w1 = g_z.t() @ m
    g_m = g_z @ w1  # (B, C)
    g_t = g_ts * gate[:, None, :] + (g_m / (h * w))[:, None, :]
    g_a = (g_t * _gelu_grad(a_r)).view(b, h, w, c).permute(0, 3, 1, 2)
    grad_in = torch.ops.aten.convolution_backward(
        g_a, xf, dw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], c, [True, False, False])[0]
    # the depthwise weight gradient tap by tap, each a per-channel sum over a (C, B*H*W) copy (ATen reduces each
    # row in one fixed order): ATen's own depthwise weight gradient changes with the thread count on AVX-512
    xpad = F.pad(xf, (1, 1, 1, 1))
    grad_dw = torch.stack([(xpad[:, :, ky:ky + h, kx:kx + w] * g_a).transpose(0, 1).reshape(c, -1).sum(1)
                           for ky in range(3) for kx in range(3)], 1).view(c, 1, 3, 3)
    grad_x = (gy + grad_in).to(x.dtype)
    return (grad_x, grad_dw.to(dw_weight.dtype), grad_w1.reshape(se_reduce_weight.shape).to(se_reduce_weight.dtype),
            grad_w2.reshape(se_expand_weight.shape).to(se_expand_weight.dtype),
            grad_pw.reshape(pw_weight.shape).to(pw_weight.dtype))


# ------------------------------------------------------------------------------------------------
# Extra ops: Linear (gcvit::linear) and Linear + exact GELU (MLP fc1, gcvit::linear_gelu) on the extension's
# GEMM backend
# ------------------------------------------------------------------------------------------------

def _check_linear_args(name, x, weight, bias):
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: x (..., {weight.shape[-1] if weight.dim() else '?'}) and weight (N, K) expected, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def _linear_kernel_args(x, weight, bias) -> bool:
    return (load() is not None and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[1] == x.shape[-1] and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1
                                                                      and bias.shape[0] == weight.shape[0])))


def _linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _linear_kernel_args(x, weight, bias):
        k = x.shape[-1]
        return load().linear(_rows(x, k), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


_linear_op = _cpu_op("linear", _linear_cpu)


@_linear_op.register_fake
def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_grads(ctx, grad_z, x, weight):
    """The gradients of z = x @ weight.T + bias for dL/dz = grad_z."""
    gz2, x2 = grad_z.reshape(-1, grad_z.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = (gz2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
    grad_w = gz2.t() @ x2 if ctx.needs_input_grad[1] else None
    grad_b = gz2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return _linear_grads(ctx, grad, x, weight)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` as ``gcvit::linear``: fp32 CPU tensors run one GEMM on the extension's backend
    (:func:`gemm_backend`: oneDNN on non-Intel CPUs, where MKL's sgemm takes a slower path) with the bias added in
    a row pass; other dtypes/devices run ``F.linear``. Autograd: PyTorch math. Raises ValueError on mismatched
    shapes."""
    _check_linear_args("linear", x, weight, bias)
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    op = _linear_cpu if _eager(x) and not _differentiated(x, weight, bias) else torch.ops.gcvit.linear
    return op(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Extra op: Linear + exact GELU (MLP fc1), gcvit::linear_gelu
# ------------------------------------------------------------------------------------------------

def _linear_gelu_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _linear_kernel_args(x, weight, bias):
        k = x.shape[-1]
        return load().linear_gelu(_rows(x, k), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias))


_linear_gelu_op = _cpu_op("linear_gelu", _linear_gelu_cpu)


@_linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None


def _linear_gelu_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    z = F.linear(x, weight, bias)  # recompute the pre-activation
    return _linear_grads(ctx, grad * _gelu_grad(z), x, weight)


_linear_gelu_op.register_autograd(_linear_gelu_backward, setup_context=_linear_gelu_setup)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` with exact-erf GELU, e.g. an MLP's fc1 + activation, as ``gcvit::linear_gelu``.

    x (..., K), weight (N, K) as nn.Linear stores it, bias (N,) or None; returns (..., N). fp32 CPU tensors run
    the C++ kernel (one MKL GEMM, then a vectorised GELU epilogue in place: no second (M, N) buffer and a cheaper
    erf than ATen's); other dtypes/devices run ``F.gelu(F.linear(...))``. Autograd: PyTorch-math backward
    (recomputes the pre-activation). Measured 1.03-1.26x over ``F.gelu(F.linear(...))`` at gcvit_tiny's fc1
    shapes (see the module docstring). Raises ValueError on mismatched shapes.
    """
    _check_linear_args("linear_gelu", x, weight, bias)
    if x.device.type != "cpu":
        return F.gelu(F.linear(x, weight, bias))
    op = _linear_gelu_cpu if _eager(x) and not _differentiated(x, weight, bias) else torch.ops.gcvit.linear_gelu
    return op(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Extra ops: the two halves' ends of a transformer block. gcvit::linear_residual_layernorm (the attention's
# output projection + bias + layer scale + residual, and the second LayerNorm) and gcvit::mlp_residual (the
# MLP + layer scale + residual). Inference ops: a differentiated call runs the PyTorch math below instead, so
# autograd stays correct.
# ------------------------------------------------------------------------------------------------

def _linear_residual_torch(x, weight, bias, residual, gamma):
    y = F.linear(x, weight, bias)
    return residual + (y * gamma if gamma is not None else y)


def _linear_residual_layernorm_torch(x, weight, bias, residual, gamma, ln_weight, ln_bias, eps):
    y = _linear_residual_torch(x, weight, bias, residual, gamma)
    return y, F.layer_norm(y, (weight.shape[0],), ln_weight, ln_bias, eps)


def _check_vectors(n, device, **vectors):
    for name, t in vectors.items():
        if t is not None:
            if tuple(t.shape) != (n,):
                raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_weight(name, weight, k, device):
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{name} must be (N, {k}) for an input of {k} features, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but x is on {device}")


def _check_residual(residual, x, n):
    if tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"residual must be {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")


def _check_linear_residual(x, weight, bias, residual, gamma, ln_weight=None, ln_bias=None):
    _check_weight("weight", weight, x.shape[-1], x.device)
    n = weight.shape[0]
    _check_residual(residual, x, n)
    _check_vectors(n, x.device, bias=bias, gamma=gamma, ln_weight=ln_weight, ln_bias=ln_bias)


def _check_mlp_residual(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma):
    _check_weight("fc1_weight", fc1_weight, x.shape[-1], x.device)
    _check_weight("fc2_weight", fc2_weight, fc1_weight.shape[0], x.device)
    _check_residual(residual, x, fc2_weight.shape[0])
    _check_vectors(fc1_weight.shape[0], x.device, fc1_bias=fc1_bias)
    _check_vectors(fc2_weight.shape[0], x.device, fc2_bias=fc2_bias, gamma=gamma)


def _use_kernel(*tensors) -> bool:
    return load() is not None and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)


def _rows(t, n):
    """(M, n) view of a (..., n) tensor with unit column stride (a copy only when the layout needs one)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n)  # not -1: with n == 0 the row count would be ambiguous
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _mlp_residual_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma):
    return _linear_residual_torch(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias, residual, gamma)


def _mlp_residual_cpu(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                      fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], residual: torch.Tensor,
                      gamma: Optional[torch.Tensor]) -> torch.Tensor:
    if _use_kernel(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma):
        c = x.shape[-1]
        y = load().mlp_residual(_rows(x, c), fc1_weight, fc1_bias, fc2_weight, fc2_bias, _rows(residual, c), gamma)
        return y.view(residual.shape)
    return _mlp_residual_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma)


_mlp_residual_op = _cpu_op("mlp_residual", _mlp_residual_cpu)


@_mlp_residual_op.register_fake
def _mlp_residual_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma):
    return residual.new_empty(residual.shape)


def _linear_residual_layernorm_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   residual: torch.Tensor, gamma: Optional[torch.Tensor], ln_weight: torch.Tensor,
                                   ln_bias: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    n = weight.shape[0]
    if _use_kernel(x, weight, bias, residual, gamma, ln_weight, ln_bias):
        y, normed = load().linear_residual_layernorm(_rows(x, x.shape[-1]), weight, bias, _rows(residual, n), gamma,
                                                     ln_weight, ln_bias, eps)
        return y.view(residual.shape), normed.view(residual.shape)
    return _linear_residual_layernorm_torch(x, weight, bias, residual, gamma, ln_weight, ln_bias, eps)


_linear_residual_layernorm_op = _cpu_op("linear_residual_layernorm", _linear_residual_layernorm_cpu)


@_linear_residual_layernorm_op.register_fake
def _linear_residual_layernorm_fake(x, weight, bias, residual, gamma, ln_weight, ln_bias, eps):
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


def _layer_norm_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    n = x.shape[-1]
    if _use_kernel(x, weight, bias):
        return load().layer_norm(_rows(x, n), weight, bias, eps).view(x.shape)
    return F.layer_norm(x, (n,), weight, bias, eps)


_layer_norm_op = _cpu_op("layer_norm", _layer_norm_cpu)


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _differentiated(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mlp_residual(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
                 fc2_bias: Optional[torch.Tensor], residual: torch.Tensor,
                 gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A block's MLP half after its norm: ``residual + gamma * fc2(gelu(fc1(x)))`` (exact GELU; gamma an optional
    LayerScale), as ``gcvit::mlp_residual``. fp32 CPU: C++, in blocks of rows whose hidden activations stay in
    L2 when the weights are small (the high-resolution stages), otherwise fc1 + GELU and fc2 + residual as two
    GEMMs with one-pass epilogues; other dtypes, and calls autograd will differentiate, run the PyTorch math.
    Raises ValueError on mismatched shapes or devices."""
    _check_mlp_residual(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma)
    if x.device.type != "cpu" or _differentiated(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma):
        return _mlp_residual_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma)
    op = _mlp_residual_cpu if _eager(x) else torch.ops.gcvit.mlp_residual
    return op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gamma)


def linear_residual_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              residual: torch.Tensor, gamma: Optional[torch.Tensor], ln_weight: torch.Tensor,
                              ln_bias: Optional[torch.Tensor], eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = residual + gamma * (x @ weight.T + bias)`` and its LayerNorm, ``(y, layer_norm(y))`` (the attention's
    output projection, the residual and the block's second norm), as ``gcvit::linear_residual_layernorm``: one
    GEMM into y, then one pass per row adding bias, scale and residual and normalising the row while it is in
    L1. fp32 CPU: C++; other dtypes, and calls autograd will differentiate, run the PyTorch math. Raises
    ValueError on mismatched shapes or devices."""
    _check_linear_residual(x, weight, bias, residual, gamma, ln_weight, ln_bias)
    if x.device.type != "cpu" or _differentiated(x, weight, bias, residual, gamma, ln_weight, ln_bias):
        return _linear_residual_layernorm_torch(x, weight, bias, residual, gamma, ln_weight, ln_bias, eps)
    op = _linear_residual_layernorm_cpu if _eager(x) else torch.ops.gcvit.linear_residual_layernorm
    return op(x, weight, bias, residual, gamma, ln_weight, ln_bias, float(eps))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` with an affine ``weight`` (and optional ``bias``), as
    ``gcvit::layer_norm``; returns a contiguous tensor of x's shape. fp32 CPU: C++, one pass per row; other
    dtypes, devices and calls autograd will differentiate run ``F.layer_norm``. Raises ValueError on mismatched
    shapes or devices."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    _check_vectors(x.shape[-1], x.device, weight=weight, bias=bias)
    if x.device.type != "cpu" or weight is None or _differentiated(x, weight, bias):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    op = _layer_norm_cpu if _eager(x) else torch.ops.gcvit.layer_norm
    return op(x, weight, bias, float(eps))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------

_CPU_KERNELS = {
    "gcvit::window_attention_fwd": _attention_fwd_cpu,
    "gcvit::window_attention_bwd": _attention_bwd_cpu,
    "gcvit::fused_mbconv_fwd": _mbconv_fwd_cpu,
    "gcvit::fused_mbconv_bwd": _mbconv_bwd_cpu,
}
_registered = set()


def _op_exists(qualname: str) -> bool:
    ns, name = qualname.split("::")
    return hasattr(getattr(torch.ops, ns), name)


def register(import_op_modules: bool = True) -> Tuple[str, ...]:
    """Give the gcvit:: ops their CPU kernels (idempotent). Imports the op modules first so the ops exist;
    an op whose module cannot be imported (e.g. no triton) stays unregistered. Returns the registered names."""
    if import_op_modules:
        import importlib

        for mod in ("gcvit_kernels.window_attention", "gcvit_kernels.mbconv"):
            try:
                importlib.import_module(mod)
            except Exception as e:  # the model then runs the reference path
                warnings.warn(f"gcvit: {mod} could not be imported ({type(e).__name__}: {e}); its CPU kernels "
                              "are not registered", RuntimeWarning, stacklevel=2)
    for name, fn in _CPU_KERNELS.items():
        if name not in _registered and _op_exists(name):
            torch.library.register_kernel(name, "cpu", fn)
            _registered.add(name)
    return tuple(sorted(_registered))


register()
