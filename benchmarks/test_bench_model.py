"""Model-level benchmarks: GC ViT reference vs fused, eager vs torch.compile, inference and a training step,
against what a user would pick instead (timm's Swin-T and ConvNeXt-T; on the CPU also ONNX Runtime and
torch.compile with freezing), all in one pytest-benchmark run:

    pytest benchmarks/test_bench_model.py --benchmark-only                    # default grid for this device
    GCVIT_BENCH_FULL=1 pytest benchmarks/test_bench_model.py --benchmark-only  # full grid (CPU: the headline)

Grids (``CASES``), one *group* per (variant, task, batch, input size, dtype), its reference eager case first:

* CPU default (a few minutes on 2 cores): fp32, inference batch 4 and training batch 2 at 224, xxtiny and tiny;
  compiled modes and ONNX Runtime for xxtiny (ONNX Runtime also for tiny), Swin-T/ConvNeXt-T eager in the tiny
  inference group, and tiny's fused inference inside ``gcvit.frozen_weights`` (``fused-frozen-weights``: its GEMM
  weights packed once, as an ONNX Runtime session does, instead of every call).
* CPU full (``GCVIT_BENCH_FULL=1``, eager cases first): the headline comparison, gcvit tiny fp32 batch 8 224
  inference: reference eager vs fused vs ONNX Runtime vs torch.compile (reference, fused, reference frozen under
  no_grad) vs Swin-T / ConvNeXt-T eager and compiled; ``gemm-floor``, the model's Linear and dense Conv2d layers
  alone on their recorded inputs (the reference's GEMM time: its speed-up is the ceiling for fusing the rest
  around the reference's GEMMs) and ``gemm-floor-fused``, the same with the Linear layers on the fused path's
  GEMM backend (the fused path's own floor; it differs where that backend is not MKL, i.e. off Intel); the fused
  path with each GEMM backend forced (``fused-gemm-blas``, ``fused-gemm-onednn``: which one this CPU should
  default to); ``fused-frozen-weights``; and the same batch with weights and input in bf16, reference eager vs
  fused.
* CUDA: bf16, every variant (xxtiny, tiny, small, base) and mode (reference, fused, compile(reference),
  compile(fused)); inference in pure bf16 (weights and input cast to bf16) at batch 64 and 256, training with
  fp32 weights under bf16 autocast at batch 128; Swin-T / ConvNeXt-T eager and compiled in the tiny groups.
* ``GCVIT_BENCH_TINY=1``: xxtiny at 64x64 with 2x2 windows, batch 1, one round: reference and fused, inference
  and training, plus frozen weights, the GEMM floor and Swin-T eager (the CI smoke test,
  tests/test_benchmark_smoke.py); ``GCVIT_BENCH_TINY=all``: the compiled modes and ONNX Runtime too at that shape
  (the smoke test marked slow).

Interleaving (the machines are noisy): every non-reference case runs its timed rounds alternately with rounds of
its group's reference eager model (pytest-benchmark's ``setup`` runs the reference round, so pytest-benchmark's
own statistics are the candidate's alone). ``speedup_vs_reference`` is the median over rounds of
reference-round time / candidate-round time, i.e. it only ever compares measurements taken minutes apart at
most, in this run. The group's reference eager case is also a test of its own (speed-up 1 by definition).

Each record (``benchmark.extra_info`` and the session JSON written by conftest.py): images/s, latency p50/p90/p99
per step, peak memory (CUDA: max allocated; CPU: peak resident set size sampled during one untimed step after its rounds,
and its growth over the resident size before the case was built), first-call time (includes compilation or
ONNX export), dynamo graph and graph-break counts, and for fused modes whether the fused ops really ran
(``fused_path_ran``: calls of ``gcvit::`` ops counted by the profiler on one step; ``fused_warnings``: the
"gcvit: fused ... not used" warnings of that case).

Environment: GCVIT_BENCH_FULL, GCVIT_BENCH_TINY, GCVIT_BENCH_DEVICE (cpu/cuda), GCVIT_BENCH_ROUNDS,
GCVIT_BENCH_WARMUP, GCVIT_BENCH_ITERS (steps per round), GCVIT_BENCH_COMPILE_BACKEND (default inductor).
"""
import contextlib
import functools
import gc
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

import gcvit
from gcvit import dispatch, profile

GCVIT_VARIANTS = ("xxtiny", "tiny", "small", "base")
SWIN = "swin_tiny_patch4_window7_224"
CONVNEXT = "convnext_tiny"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    device: str
    grid: str  # "default", "full", "tiny" or "tiny-all"
    dtype: str
    rounds: int  # timed rounds per case (each interleaved with one reference round)
    iters: int  # steps per round
    warmup: int  # untimed steps after the first call
    compile_backend: str
    infer_precision: str
    train_precision: str
    threads: int

    @property
    def tag(self) -> Optional[str]:
        return None if self.grid == "default" else self.grid


def current_settings() -> Settings:
    device = os.environ.get("GCVIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = os.environ.get("GCVIT_BENCH_TINY", "")
    grid = ("tiny-all" if tiny == "all" else "tiny" if _env_flag("GCVIT_BENCH_TINY") else
            "full" if _env_flag("GCVIT_BENCH_FULL") else "default")
    if device == "cuda":
        dtype, rounds, iters, warmup = "bf16", 10, 5, 5
        infer_p, train_p = "pure bf16 (weights and input in bf16)", "fp32 weights, bf16 autocast"
    else:
        dtype, rounds, iters, warmup = "fp32", (4 if grid == "full" else 3), 1, 1
        infer_p = train_p = "fp32"
        if grid == "full":
            infer_p = "fp32; the bf16 group: weights and input in bf16"
    if grid.startswith("tiny"):
        rounds, iters, warmup = 1, 1, 0
    return Settings(device=device, grid=grid, dtype=dtype, rounds=_env_int("GCVIT_BENCH_ROUNDS", rounds),
                    iters=_env_int("GCVIT_BENCH_ITERS", iters), warmup=_env_int("GCVIT_BENCH_WARMUP", warmup),
                    compile_backend=os.environ.get("GCVIT_BENCH_COMPILE_BACKEND", "inductor"),
                    infer_precision=infer_p, train_precision=train_p, threads=torch.get_num_threads())


SETTINGS = current_settings()


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    variant: str  # the gcvit variant whose group this case belongs to
    model: str  # "gcvit" or a timm model name
    impl: str  # "reference", "fused", "onnxruntime" (gcvit) or "eager" (timm)
    compiled: str  # "", "compile" or "compile-frozen" (CPU inference: freezing=True under no_grad)
    task: str  # "infer" or "train"
    batch: int
    img_size: int
    dtype: str
    window_size: Optional[int] = None  # override (tiny smoke shapes)
    gemm: str = ""  # CPU fused: "" (the default GEMM backend) or a forced one, "blas" / "onednn"
    frozen: bool = False  # CPU fused inference inside gcvit.frozen_weights (GEMM weights packed once)

    @property
    def group(self) -> str:
        return f"{self.variant}/{self.task}/b{self.batch}/{self.img_size}/{self.dtype}"

    @property
    def mode(self) -> str:
        base = self.impl if self.model == "gcvit" else self.model
        if self.impl == "onnxruntime":
            return "onnxruntime-reference"
        if self.gemm:
            base = f"{base}-gemm-{self.gemm}"
        if self.frozen:
            base = f"{base}-frozen-weights"
        return f"{self.compiled}-{base}" if self.compiled else base

    @property
    def id(self) -> str:
        return f"{self.group}/{self.mode}"

    @property
    def is_reference(self) -> bool:
        return self.model == "gcvit" and self.impl == "reference" and not self.compiled

    def reference(self) -> "Case":
        return Case(self.variant, "gcvit", "reference", "", self.task, self.batch, self.img_size, self.dtype,
                    self.window_size)


def _group(variant, task, batch, img, dtype, gcvit_modes, timm_modes=(), window_size=None) -> List[Case]:
    cases = [Case(variant, "gcvit", "reference", "", task, batch, img, dtype, window_size)]
    for impl, compiled, *gemm in gcvit_modes:
        case = Case(variant, "gcvit", impl, compiled, task, batch, img, dtype, window_size, *gemm)
        if not case.is_reference:
            cases.append(case)
    for name, compiled in timm_modes:
        cases.append(Case(variant, name, "eager", compiled, task, batch, img, dtype, window_size))
    return cases


EAGER = (("fused", ""),)
COMPILED = (("reference", "compile"), ("fused", "compile"))
CPU_INFER_EXTRA = (("onnxruntime", ""), ("reference", "compile-frozen"))
# the fused path with each GEMM backend forced, so a run shows which one this CPU should default to
CPU_GEMMS = (("fused", "", "blas"), ("fused", "", "onednn"))
# the fused path with its GEMM weights packed once (what an ONNX Runtime session does at creation)
FROZEN = (("fused", "", "", True),)
TIMM_EAGER = ((SWIN, ""), (CONVNEXT, ""))
TIMM_ALL = TIMM_EAGER + ((SWIN, "compile"), (CONVNEXT, "compile"))


def build_cases(settings: Settings) -> List[Case]:
    if settings.grid == "tiny-all":  # every code path at the tiny shape (compiled modes, ONNX Runtime)
        extra = CPU_INFER_EXTRA if settings.device == "cpu" else ()
        return (_group("xxtiny", "infer", 1, 64, settings.dtype, EAGER + COMPILED + extra, ((SWIN, "compile"),),
                       window_size=2)
                + _group("xxtiny", "train", 1, 64, settings.dtype, COMPILED, window_size=2))
    if settings.grid == "tiny":
        return (_group("xxtiny", "infer", 1, 64, settings.dtype, EAGER + FROZEN + (("gemm-floor", ""),),
                       ((SWIN, ""),), window_size=2)
                + _group("xxtiny", "train", 1, 64, settings.dtype, EAGER, window_size=2))
    if settings.device == "cuda":
        cases = []
        for variant in GCVIT_VARIANTS:
            timm_modes = TIMM_ALL if variant == "tiny" else ()
            for batch in (64, 256):
                cases += _group(variant, "infer", batch, 224, settings.dtype, EAGER + COMPILED, timm_modes)
            cases += _group(variant, "train", 128, 224, settings.dtype, EAGER + COMPILED, timm_modes)
        return cases
    if settings.grid == "full":
        cases = _group("tiny", "infer", 8, 224, settings.dtype,
                       EAGER + FROZEN + (("onnxruntime", ""), ("gemm-floor", ""), ("gemm-floor-fused", ""))
                       + CPU_GEMMS + COMPILED + (("reference", "compile-frozen"),),
                       TIMM_ALL)
        # a bf16 model on this CPU: the fused path computes in fp32 where the CPU has no native bf16
        cases += _group("tiny", "infer", 8, 224, "bf16", EAGER)
        return sorted(cases, key=lambda c: c.compiled != "")  # eager cases first (stable): cheap before compiles
    return (_group("xxtiny", "infer", 4, 224, settings.dtype, EAGER + COMPILED + CPU_INFER_EXTRA)
            + _group("tiny", "infer", 4, 224, settings.dtype, EAGER + FROZEN + (("onnxruntime", ""),), TIMM_EAGER)
            + _group("xxtiny", "train", 2, 224, settings.dtype, EAGER)
            + _group("tiny", "train", 2, 224, settings.dtype, EAGER))


CASES = build_cases(SETTINGS)


# ----------------------------------------------------------------------------------------------- runners


class Skip(Exception):
    """A case that cannot run here, with the reason recorded in the results."""


@dataclass
class Runner:
    step: Callable[[], None]
    first_call_s: float
    prepare_s: float  # building (and exporting / compiling setup) before the first call
    info: Dict[str, Any]
    keep: Any = None  # objects that must stay alive (model, session, input)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


class RssSampler:
    """Peak resident set size (MB) while active, sampled every few milliseconds on a thread (CPU runs)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._stop.clear()
        self.peak = max(self.peak, _rss_mb())
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _torch_dtypes(case: Case) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype of weights and input, autocast dtype or None): pure dtype for inference, autocast for training."""
    dtype = profile.parse_dtype(case.dtype)
    if dtype == torch.float32:
        return dtype, None
    return (dtype, None) if case.task == "infer" else (torch.float32, dtype)


def build_module(case: Case, device: torch.device, fused: Optional[bool] = None) -> torch.nn.Module:
    torch.manual_seed(0)
    if case.model == "gcvit":
        overrides = {"img_size": case.img_size}
        if case.window_size is not None:
            overrides["window_size"] = case.window_size
        model = gcvit.create_model(case.variant, fused=case.impl == "fused" if fused is None else fused, **overrides)
    else:
        import timm

        kwargs = {}
        if case.img_size != 224 and case.model == SWIN:
            kwargs = dict(img_size=case.img_size, window_size=case.window_size or 7)
        model = timm.create_model(case.model, pretrained=False, **kwargs)
    param_dtype, _ = _torch_dtypes(case)
    return model.to(device=device, dtype=param_dtype)


_GMACS: Dict[Tuple, Optional[float]] = {}


def gmacs(case: Case) -> Optional[float]:
    """Multiply-adds of one image (G), counted on the meta device with gcvit.profile.count_gmacs."""
    key = (case.model, case.variant if case.model == "gcvit" else None, case.img_size, case.window_size)
    if key not in _GMACS:
        try:
            with torch.device("meta"):
                model = build_module(case, torch.device("meta"), fused=False).eval()
            _GMACS[key] = round(profile.count_gmacs(model, case.img_size), 3)
        except Exception:  # a counting failure must not lose the timing
            _GMACS[key] = None
    return _GMACS[key]


def _onnx_runner(case: Case, device: torch.device, settings: Settings) -> Runner:
    if device.type != "cpu":
        raise Skip("ONNX Runtime is benchmarked on the CPU only")
    try:
        import onnxruntime as ort
    except Exception as exc:
        raise Skip(f"onnxruntime not importable: {exc}")
    t0 = time.perf_counter()
    model = build_module(case, device, fused=False).eval()
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)
    path = os.path.join(tempfile.mkdtemp(prefix="gcvit-bench-"), f"{case.variant}.onnx")
    errors = []
    exporter = None
    for dynamo in (True, False):  # the dynamo exporter first, then the TorchScript one
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, opset_version=18, dynamo=dynamo, input_names=["images"],
                                  output_names=["logits"])
            exporter = "dynamo" if dynamo else "torchscript"
            break
        except Exception as exc:
            errors.append(f"torch.onnx.export(dynamo={dynamo}): {type(exc).__name__}: {str(exc)[:500]}")
    if exporter is None:
        raise Skip("ONNX export failed: " + " | ".join(errors))
    export_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    # ORT's idle workers spin after each run by default: in an interleaved run they would take the cores from
    # the case timed next (measured: reference eager 20-25% slower right after an ORT round), so they sleep
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        expected = model(x)
    t1 = time.perf_counter()
    out = session.run(None, feed)[0]
    first = time.perf_counter() - t1
    max_diff = float((torch.from_numpy(out) - expected).abs().max())
    if not max_diff < 1e-2:  # a wrong export would make its speed meaningless
        raise Skip(f"ONNX Runtime output differs from the reference by {max_diff:.3e}")

    def step():
        session.run(None, feed)

    info = {"onnx_exporter": exporter, "onnx_opset": 18, "onnx_export_s": round(export_s, 2),
            "onnx_max_abs_diff_vs_reference": max_diff, "onnxruntime_threads": settings.threads,
            "onnx_export_errors": errors}
    return Runner(step, first, time.perf_counter() - t0 - first, info, keep=(session, feed, path))


def _gemm_floor_runner(case: Case, device: torch.device) -> Runner:
    """Every Linear and dense Conv2d of the reference model, run alone on the input it got in one forward.

    ``gemm-floor``: as the reference runs them (ATen: MKL for Linear, oneDNN for Conv2d), so its speed-up over the
    reference bounds what fusing everything else around the reference's GEMMs could give.
    ``gemm-floor-fused`` (CPU): the Linear layers on the fused path's GEMM backend instead
    (``gcvit_kernels.cpu.linear``; oneDNN off Intel, where MKL is slower), the floor of the fused path itself."""
    if case.task != "infer":
        raise Skip("the GEMM floor is an inference measure")
    linear = None
    if case.impl == "gemm-floor-fused":
        from gcvit_kernels import cpu

        if device.type != "cpu" or not cpu.available():
            raise Skip("the fused path's GEMM backend is the C++ CPU extension's")
        linear = cpu.linear
    t0 = time.perf_counter()
    model = build_module(case, device, fused=False).eval()
    param_dtype, _ = _torch_dtypes(case)
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device, dtype=param_dtype)
    calls = []
    hooks = [m.register_forward_hook(lambda module, args, out: calls.append((module, args[0])))
             for m in model.modules()
             if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()

    if linear is not None:
        calls = [(functools.partial(linear, weight=m.weight, bias=m.bias) if isinstance(m, torch.nn.Linear) else m, a)
                 for m, a in calls]

    def step():
        with torch.inference_mode():
            for module, inputs in calls:
                module(inputs)

    prepare = time.perf_counter() - t0
    t1 = time.perf_counter()
    step()
    info = {"gemm_floor_calls": len(calls)}
    if linear is not None:
        from gcvit_kernels import cpu

        info["gemm_backend"] = cpu.gemm_backend()
    return Runner(step, time.perf_counter() - t1, prepare, info, keep=(model, calls))


def _dynamo_counts() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {"dynamo_graphs": int(counters["stats"]["unique_graphs"]),
            "dynamo_graph_breaks": int(sum(counters["graph_break"].values()))}


def make_runner(case: Case, device: torch.device, settings: Settings) -> Runner:
    """Build the model of ``case``, its step closure, and run the first call (compilation, kernel builds)."""
    if case.impl == "onnxruntime":
        return _onnx_runner(case, device, settings)
    if case.impl in ("gemm-floor", "gemm-floor-fused"):
        return _gemm_floor_runner(case, device)
    t0 = time.perf_counter()
    model = build_module(case, device)
    param_dtype, amp = _torch_dtypes(case)
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device, dtype=param_dtype)
    info: Dict[str, Any] = {}
    if case.compiled:
        from torch import _dynamo

        _dynamo.reset()  # fresh caches: no recompile limit carried over from earlier cases
        _dynamo.utils.counters.clear()
        info["compile_backend"] = settings.compile_backend
    if case.compiled == "compile-frozen":
        if case.task != "infer":
            raise Skip("freezing is an inference-only compilation")
        options = {"freezing": True} if settings.compile_backend == "inductor" else None
        compiled = torch.compile(model.eval(), backend=settings.compile_backend, options=options)
        info["compile_options"] = options or {}

        def step():
            with torch.no_grad():
                compiled(x)
    else:
        target = torch.compile(model, backend=settings.compile_backend) if case.compiled else model
        step = profile.make_step(target, x, case.task, amp)
    if case.gemm:
        step = _with_gemm_backend(step, case.gemm, device)
        info["gemm_backend"] = case.gemm
    prepare = time.perf_counter() - t0
    t1 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t1
    if case.compiled:
        info.update(_dynamo_counts())
    return Runner(step, first, prepare, info, keep=(model, x))


def _with_gemm_backend(step: Callable[[], None], backend: str, device: torch.device) -> Callable[[], None]:
    """``step`` with the C++ CPU ops' GEMMs on ``backend`` (restored after each call)."""
    from gcvit_kernels import cpu

    ext = cpu.load()
    if device.type != "cpu" or ext is None:
        raise Skip("a GEMM backend is a setting of the C++ CPU extension")
    if backend == "onednn" and not ext.has_onednn():
        raise Skip("this torch has no oneDNN matmul")

    def forced():
        previous = cpu.gemm_backend()
        cpu.set_gemm_backend(backend)
        try:
            step()
        finally:
            cpu.set_gemm_backend(previous)
    return forced


def count_fused_ops(step: Callable[[], None], device: torch.device) -> Dict[str, int]:
    """Calls of gcvit's custom ops (``gcvit::...``, ``gcvit_cpu::...``) in one step, from the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    counts: Dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith(("gcvit::", "gcvit_cpu::")):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def summarize(samples_ms: List[float], batch: int) -> Dict[str, float]:
    pct = profile._percentile  # the same percentile rule as gcvit.profile.time_step
    return {"images_per_s": batch * len(samples_ms) / (sum(samples_ms) / 1e3),
            "latency_ms_p50": pct(samples_ms, 50), "latency_ms_p90": pct(samples_ms, 90),
            "latency_ms_p99": pct(samples_ms, 99), "steps": len(samples_ms)}


def reference_runner(case: Case, device: torch.device, settings: Settings, collector) -> Runner:
    """The group's reference eager runner, built once per group and held by the session collector."""
    ref = case.reference()

    def build():
        runner = make_runner(ref, device, settings)
        for _ in range(settings.warmup):
            runner.step()
        return runner

    return collector.group_cached(ref.group, build)


def run_case(case: Case, benchmark, collector, settings: Settings = SETTINGS) -> Dict[str, Any]:
    """Measure ``case`` (interleaved with its group's reference eager rounds) and return its record; a frozen
    case runs inside one gcvit.frozen_weights block (the reference model does not use the C++ ops' GEMMs)."""
    if case.task == "infer" and case.frozen:
        with gcvit.frozen_weights():
            return _run_case(case, benchmark, collector, settings)
    return _run_case(case, benchmark, collector, settings)


def _run_case(case: Case, benchmark, collector, settings: Settings) -> Dict[str, Any]:
    device = profile.parse_device(settings.device)
    collector.device_type = device.type
    collector.settings = {k: v for k, v in asdict(settings).items()}
    collector.settings.update(tag=settings.tag, cases=len(CASES))
    record: Dict[str, Any] = dict(id=case.id, group=case.group, variant=case.variant, model=case.model,
                                  mode=case.mode, impl=case.impl, compiled=case.compiled, task=case.task,
                                  batch=case.batch, img_size=case.img_size, window_size=case.window_size,
                                  dtype=case.dtype, device=device.type, frozen_weights=case.frozen,
                                  precision=settings.infer_precision if case.task == "infer" else settings.train_precision,
                                  measured=False, status="running")
    record["gmacs_per_image"] = gmacs(case) if case.impl != "onnxruntime" else gmacs(case.reference())
    try:
        if case.task == "train" and (case.impl == "onnxruntime" or case.compiled == "compile-frozen"):
            raise Skip(f"{case.mode} is inference only")
        if case.is_reference:
            collector.release()  # the previous group's reference runner
        else:
            reference_runner(case, device, settings, collector)  # built before rss_before (once per group)
        gc.collect()
        rss_before = _rss_mb()
        fused_warnings: List[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case.impl == "fused":
                dispatch._warned.clear()  # warn_once: let this case report its own fallbacks
            runner = make_runner(case, device, settings)
            if case.impl == "fused":
                record["fused_ops_per_step"] = count_fused_ops(runner.step, device)
            for _ in range(settings.warmup):
                runner.step()
        fused_warnings = sorted({str(w.message) for w in caught if str(w.message).startswith("gcvit:")})
        record.update(runner.info)
        record.update(prepare_s=round(runner.prepare_s, 3), first_call_s=round(runner.first_call_s, 3),
                      gcvit_warnings=fused_warnings)
        if case.impl == "fused":
            ops = record["fused_ops_per_step"]
            record["fused_path_ran"] = bool(ops)
            record["fused_path"] = ("fused kernels ran" if ops and not fused_warnings else
                                    "partly: some ops fell back to the reference" if ops else
                                    "NO: every op fell back to the reference math")
        else:
            record["fused_path_ran"] = False

        ref = None if case.is_reference else reference_runner(case, device, settings, collector)
        cand_samples: List[float] = []
        ref_samples: List[float] = []
        round_ratios: List[float] = []
        peaks: List[float] = []
        sampler = RssSampler() if device.type == "cpu" else None

        def reference_round():
            if ref is not None:
                t = profile.time_step(ref.step, device, case.batch, settings.iters, 0)
                ref_samples.extend(t.samples_ms)

        def candidate_round():
            t = profile.time_step(runner.step, device, case.batch, settings.iters, 0)
            cand_samples.extend(t.samples_ms)
            peaks.append(t.peak_memory_mb)
            if ref is not None:
                round_ratios.append(sum(ref_samples[-settings.iters:]) / sum(t.samples_ms))

        benchmark.pedantic(candidate_round, setup=reference_round, rounds=settings.rounds, iterations=1)
        if sampler is not None:
            # one more, untimed step for the memory peak: the sampling thread's wake-ups on a small machine
            # slowed the step it watched by ~12% (measured), so it never runs during a timed round
            with sampler:
                runner.step()
        record["measured"] = bool(benchmark.enabled)
        record.update(summarize(cand_samples, case.batch))
        if device.type == "cuda":
            record["peak_memory_mb"] = max(peaks)
            record["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
        else:
            record["peak_memory_mb"] = sampler.peak
            record["peak_memory_growth_mb"] = sampler.peak - rss_before
            record["peak_memory_kind"] = "peak RSS of the process sampled during one untimed step after the timed ones (growth: over RSS before the case was built)"
        if record.get("gmacs_per_image"):
            record["achieved_gmacs_per_s"] = record["gmacs_per_image"] * record["images_per_s"]
        if ref is None:
            collector.group_cached(case.group, lambda: runner)  # later cases of the group reuse this runner
            record.update(speedup_vs_reference=1.0, reference_images_per_s=record["images_per_s"],
                          speedup_rounds=[1.0] * len(cand_samples))
        else:
            ref_summary = summarize(ref_samples, case.batch)
            record.update(speedup_vs_reference=statistics.median(round_ratios),
                          speedup_rounds=round_ratios,
                          speedup_throughput=record["images_per_s"] / ref_summary["images_per_s"],
                          reference_images_per_s=ref_summary["images_per_s"],
                          reference_latency_ms_p50=ref_summary["latency_ms_p50"])
        record["status"] = "ok"
        record["samples_ms"] = [round(s, 3) for s in cand_samples]
        record["reference_samples_ms"] = [round(s, 3) for s in ref_samples]
        return record
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
        return record
    except Exception as exc:  # recorded (with the reason) and turned into a test failure by test_model
        import traceback

        record.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:1000]}",
                      traceback=traceback.format_exc()[-3000:])
        return record
    finally:
        gc.collect()


# ----------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model(case: Case, benchmark, bench_collector):
    benchmark.group = case.group
    record = run_case(case, benchmark, bench_collector)
    bench_collector.add(record)  # failed and skipped cases are recorded too, with their reason
    benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("samples_ms", "reference_samples_ms")})
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    if record["status"] != "ok":
        pytest.fail(f"{case.id}: {record.get('reason')}")
    rounds = SETTINGS.rounds if benchmark.enabled else 1  # --benchmark-disable: pytest-benchmark runs one round
    assert record["images_per_s"] > 0 and record["steps"] == rounds * SETTINGS.iters
