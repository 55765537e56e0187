"""Measuring models: parameter counts, multiply-adds, and timed runs (used by the CLI and the benchmarks)."""
import contextlib
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; expected 'cpu' or 'cuda[:N]'") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; expected 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available here")
    return device


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module, img_size, in_chans: int = 3) -> float:
    """Multiply-adds (G) of one image, as GC ViT reports FLOPs; counted on the meta device, nothing runs."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.empty(1, in_chans, h, w, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@dataclass
class Timing:
    images_per_s: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    peak_memory_mb: float
    iters: int
    batch: int
    samples_ms: List[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.pop("samples_ms")
        return d


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[idx]


def time_step(step: Callable[[], None], device: torch.device, batch: int, iters: int, warmup: int,
              progress: Optional[Callable[[int], None]] = None) -> Timing:
    """Time ``step`` ``iters`` times after ``warmup`` runs; per-iteration latencies and peak memory.

    Peak memory: CUDA's max_memory_allocated on a GPU; on the CPU the process's peak resident set size
    (ru_maxrss), which includes everything the process has held, so compare it only between runs of one process
    with care."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        step()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
        if progress:
            progress(i)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total_s = sum(samples) / 1e3
    return Timing(batch * iters / total_s, _percentile(samples, 50), _percentile(samples, 90),
                  _percentile(samples, 99), peak, iters, batch, samples)


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, amp_dtype: Optional[torch.dtype] = None):
    """A closure running one inference forward or one training step (forward, backward, optimizer)."""
    device = x.device
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)
        return step
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        target = torch.randint(0, max(1, model.num_classes), (x.shape[0],), device=device)

        def step():
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    raise ValueError(f"unknown mode {mode!r}; expected 'infer' or 'train'")
