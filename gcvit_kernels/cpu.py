"""C++ CPU kernels for GC ViT's fused ops (csrc/gcvit_cpu.cpp), registered as the "cpu" kernels of the
custom ops that gcvit_kernels.window_attention and gcvit_kernels.mbconv define.

Build: ``torch.utils.cpp_extension.load`` with ninja, on first use, into a stable cache directory
(``$GCVIT_EXT_DIR`` or ``~/.cache/gcvit/torch_extensions/<torch>-<python>/<variant>``); torch's
extension loader rebuilds only when the sources or flags change, and a file lock keeps concurrent
processes from building twice. Flags: ``-O3`` and no ``-march=native``. The variant is picked at
run time from ``torch.backends.cpu.get_cpu_capability()``: an ``avx2`` build (``-mavx2 -mfma -mf16c``,
``at::vec`` compiled as ATen's AVX2 capability) on AVX2/AVX512 CPUs, a generic ``default`` build
otherwise, so a cache shared between machines never runs instructions a CPU lacks.

``load()`` never raises: without a compiler or on a build failure it emits one warning and
``available()`` is False; the CPU kernels of the ops then run the PyTorch reference math.

Ops given CPU kernels here (schemas defined by the Triton op modules):

* ``gcvit::window_attention_fwd`` -- C++ (fp32, bf16; other dtypes: PyTorch math).
  Per (window, head) task: Q (scaled), K^T, V packed from the qkv map into a per-thread fp32 tile,
  register-blocked Q K^T + relative-position bias (gathered in-kernel into a (heads, N, N) table),
  softmax, P V, written straight into the (B, H, W, C) output; lse saved for the backward.
* ``gcvit::window_attention_bwd`` -- PyTorch math from the saved lse (flash-attention style
  recompute of P, one batched pass; deterministic).
* ``gcvit::fused_mbconv_fwd`` -- C++ depthwise 3x3 + exact GELU + SE pool partial sums in one pass
  (NCHW and channels_last), SE gate in fp32, gate folded into the 1x1 weights per image, residual as
  the GEMM's beta=1 input (one batched GEMM).
* ``gcvit::fused_mbconv_bwd`` -- explicit PyTorch math (recompute from the inputs).

Extra ops (CPU only, own schemas, fake impls and PyTorch-math autograd), see their functions'
docstrings: :func:`linear_gelu` and :func:`layernorm_linear`. Measurements: see MEASUREMENTS below.
"""
from __future__ import annotations

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

MEASUREMENTS = """(filled in below after measuring)"""


def _variant() -> Tuple[str, list]:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if cap in ("AVX2", "AVX512") and sys.platform.startswith("linux"):
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", ["-DCPU_CAPABILITY=DEFAULT"]


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
                    extra_cflags=["-O3", "-fno-math-errno", *flags],
                    build_directory=build_dir,
                    is_python_module=False,  # TORCH_LIBRARY(gcvit_cpu, ...) ops, loaded into torch.ops
                    verbose=os.environ.get("GCVIT_EXT_VERBOSE", "") not in ("", "0"),
                )
            _ext = torch.ops.gcvit_cpu
            _ext.vec_size()  # the library answers
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


def available() -> bool:
    """True when the C++ CPU extension is built and loaded (builds it on first call)."""
    return load() is not None


def load_error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _error
