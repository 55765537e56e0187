"""Command line: ``python -m gcvit list | bench | check``."""
import argparse
import contextlib
import json
import sys

import torch

import gcvit
from gcvit import profile
from gcvit.variants import VARIANTS


def cmd_list(args) -> int:
    print(f"{'variant':<10} {'input':>7} {'windows':<16} {'params (M)':>10} {'GMACs':>8}  timm name")
    for name, v in VARIANTS.items():
        with torch.device("meta"):
            model = gcvit.create_model(name).eval()
        gmacs = profile.count_gmacs(model, v.img_size)
        windows = ",".join(str(w[0]) for w in model.window_size)
        print(f"{name:<10} {v.img_size:>7} {windows:<16} {profile.count_params(model) / 1e6:>10.2f} {gmacs:>8.2f}  "
              f"{v.timm_name or '-'}")
    return 0


def _build(args, device, dtype):
    model = gcvit.create_model(args.model, img_size=args.img_size or gcvit.get_variant(args.model).img_size)
    return model.to(device=device, dtype=dtype)


def cmd_bench(args) -> int:
    from tqdm import tqdm

    device = profile.parse_device(args.device)
    dtype = profile.parse_dtype(args.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
    # fp32 weights with autocast for training in reduced precision; pure dtype for inference
    amp = dtype if (args.mode == "train" and dtype != torch.float32) else None
    param_dtype = torch.float32 if amp else dtype
    impls = ["reference", "fused"] if args.impl == "both" else [args.impl]
    results = {}
    for impl in impls:
        torch.manual_seed(0)
        model = _build(args, device, param_dtype).set_fused(impl == "fused")
        if args.compile:
            model = torch.compile(model)
        size = model.img_size if hasattr(model, "img_size") else model._orig_mod.img_size
        x = torch.randn(args.batch, 3, *size, device=device, dtype=param_dtype)
        step = profile.make_step(model, x, args.mode, amp)
        bar = tqdm(total=args.iters, desc=f"{args.model} {impl}", unit="it", leave=False, disable=args.quiet)
        frozen = gcvit.frozen_weights() if args.frozen_weights and args.mode == "infer" else contextlib.nullcontext()
        with frozen:
            timing = profile.time_step(step, device, args.batch, args.iters, args.warmup,
                                       progress=lambda i: bar.update())
        bar.close()
        results[impl] = timing.as_dict()
        print(f"{args.model:<8} {impl:<9} {args.mode:<5} {device.type:<4} {args.dtype:<4} batch {args.batch:<4}"
              f"{timing.images_per_s:9.1f} img/s   p50 {timing.latency_ms_p50:8.1f} ms   p90 "
              f"{timing.latency_ms_p90:8.1f} ms   p99 {timing.latency_ms_p99:8.1f} ms   peak "
              f"{timing.peak_memory_mb:8.0f} MB")
    if len(results) == 2:
        ratio = results["fused"]["images_per_s"] / results["reference"]["images_per_s"]
        print(f"fused / reference: {ratio:.2f}x (same process, same machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=str(device), dtype=args.dtype, mode=args.mode,
                           batch=args.batch, frozen_weights=args.frozen_weights, torch=torch.__version__,
                           results=results), f, indent=2)
    return 0


def cmd_check(args) -> int:
    from gcvit.check import compare, randomise_

    device = profile.parse_device(args.device)
    dtype = profile.parse_dtype(args.dtype)
    torch.manual_seed(0)
    model = randomise_(_build(args, device, dtype))
    x = torch.randn(args.batch, 3, *model.img_size, device=device, dtype=dtype)
    result = compare(model, x, dtype)
    for message in result.fused_warnings:
        print(f"note: {message}")
    print(f"logits: max |fused - reference| = {result.logits_max_diff:.3e} (tolerance {result.logits_tol:.1e})")
    print(f"gradients: worst relative max diff = {result.worst_grad_rel_diff:.3e} in {result.worst_grad} "
          f"(tolerance {result.grad_tol:.1e})")
    print("OK" if result.ok else "OUT OF TOLERANCE")
    return 0 if result.ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="variants with params and GMACs at their resolution")

    def common(p, batch):
        p.add_argument("--model", default="xxtiny", help=f"one of {', '.join(VARIANTS)}")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--img-size", type=int, default=None, help="input size (default: the variant's)")

    bench = sub.add_parser("bench", help="images/s, latency percentiles, peak memory")
    common(bench, 8)
    bench.add_argument("--mode", default="infer", choices=["infer", "train"])
    bench.add_argument("--impl", default="both", choices=["reference", "fused", "both"])
    bench.add_argument("--compile", action="store_true", help="torch.compile the model")
    bench.add_argument("--frozen-weights", action="store_true",
                       help="inference inside gcvit.frozen_weights(): CPU GEMM weights packed once, not every call")
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--json", help="also write the numbers to this JSON file")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    check = sub.add_parser("check", help="fused vs reference logits and gradients; exit code 1 if out of tolerance")
    common(check, 2)
    args = parser.parse_args(argv)
    if getattr(args, "model", None) is not None:
        try:
            gcvit.get_variant(args.model)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        return {"list": cmd_list, "bench": cmd_bench, "check": cmd_check}[args.command](args)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
