"""The fused model end to end: equivalence with the reference, timm patching, torch.compile, DDP and FSDP2."""
import copy
import threading
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gcvit
from gcvit import dispatch
from gcvit.check import compare, randomise_
from gcvit_kernels import cpu

from conftest import TRITON_INTERPRETED

needs_cpu_kernels = pytest.mark.skipif(not cpu.available(), reason=f"C++ CPU kernels not built: {cpu.load_error()}")

SMALL = dict(img_size=64, window_size=2)  # maps 16, 8, 4, 2: windows of 2x2, every kind of block and generator


def _small_model(**kw):
    torch.manual_seed(0)
    return randomise_(gcvit.create_model("xxtiny", **SMALL, **kw))


def _no_fallback(result):
    assert not result.fused_warnings, result.fused_warnings


# The interpreter costs milliseconds per program instance, so CI runs xxtiny's architecture at 32x32 (maps 8, 4,
# 2, 1; windows 2, 2, 2, 1): every kind of block, generator level and kernel, in fp64 so any wiring mistake
# stands out; the 64x64 run (windows of 2 at every stage, batch 2) is marked slow.
@pytest.mark.skipif(not TRITON_INTERPRETED and not torch.cuda.is_available(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("img_size,window_size,batch", [
    (32, (2, 2, 2, 1), 1),
    pytest.param(64, 2, 2, marks=pytest.mark.slow),
])
def test_whole_model_triton_kernels_match_reference(img_size, window_size, batch):
    """Every attention and Fused-MBConv block through the Triton kernels (the interpreter on CPU)."""
    torch.manual_seed(0)
    model = randomise_(gcvit.create_model("xxtiny", img_size=img_size, window_size=window_size)).double()
    x = torch.randn(batch, 3, img_size, img_size, dtype=torch.float64)
    with dispatch.use_backend("triton"):
        result = compare(model, x, torch.float64)
    _no_fallback(result)
    assert result.ok, result


@needs_cpu_kernels
@pytest.mark.parametrize("name,kw,batch", [("xxtiny", SMALL, 3), ("xxtiny", {}, 2), ("tiny", {}, 1)])
def test_whole_model_cpu_kernels_match_reference(name, kw, batch):
    torch.manual_seed(0)
    model = randomise_(gcvit.create_model(name, **kw))
    x = torch.randn(batch, 3, *model.img_size)
    result = compare(model, x, torch.float32)
    _no_fallback(result)
    assert result.ok, result


class CountOps:
    """The names of the dispatcher ops called inside the context (the profiler's op events, so the extension's
    C++ kernels count too, which eager inference calls without the gcvit:: custom op's dispatch)."""

    def __enter__(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        self.names = {e.name for e in self._profile.events()}

    def ran(self, *ops):
        """Whether any of the ops (``namespace::name``) ran."""
        return any(op in self.names for op in ops)


@needs_cpu_kernels
def test_cpu_runs_kernels_for_inference_and_reference_for_training():
    model = _small_model(fused=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), CountOps() as inference:
        model.eval()(x)
    with CountOps() as training:
        model.train()(x).sum().backward()
    # the extension's kernel of each fused block op
    fused_ops = [f"gcvit_cpu::{op}" for op in ("window_attention_fwd", "fused_mbconv_fwd", "mlp_residual",
                                                "linear_residual_layernorm", "layer_norm")]
    assert all(inference.ran(op) for op in fused_ops)
    assert not training.ran(*fused_ops, "gcvit::window_attention_fwd", "gcvit::fused_mbconv_fwd")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_half_precision_inference_computes_in_fp32(monkeypatch, dtype):
    """A bf16/fp16 fused model on a CPU without native arithmetic for it runs the fp32 kernels (the fp32-only
    fused block ops show it) and returns its own dtype, no further from the fp32 truth than the half-precision
    reference; on a CPU that computes the dtype natively it stays in that dtype."""
    model = _small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        truth = model(x)
        model.to(dtype)
        reference = model(x.to(dtype))
        gcvit.fuse(model)
        got = {}
        for native in (False, True):
            monkeypatch.setattr(dispatch, "_cpu_computes_natively", lambda _dtype, native=native: native)
            with CountOps() as ops:
                got[native] = (model(x.to(dtype)), ops)
        model.as_feature_pyramid()
        monkeypatch.setattr(dispatch, "_cpu_computes_natively", lambda _dtype: False)
        pyramid = model(x.to(dtype))
    (in_fp32, ops_fp32), (native_out, ops_native) = got[False], got[True]
    assert in_fp32.dtype == native_out.dtype == dtype and all(f.dtype == dtype for f in pyramid)
    assert ops_fp32.ran("gcvit_cpu::mlp_residual")
    assert not ops_native.ran("gcvit_cpu::mlp_residual", "gcvit::mlp_residual")
    torch.testing.assert_close(in_fp32.float(), reference.float(), atol=5e-2, rtol=5e-2)
    assert (in_fp32.float() - truth).abs().max() <= (reference.float() - truth).abs().max()


@needs_cpu_kernels
def test_cpu_half_precision_concurrent_calls_leave_the_model_intact(monkeypatch):
    """The fp32 path swaps the model's tensors for each call; threads sharing one model must neither fail nor
    leave fp32 copies behind as its parameters (without the per-model lock this fails every time; with the
    parameters' dtype checked outside the lock, about one run in six: a call saw another's fp32 copies and ran
    the bf16 path on them)."""
    monkeypatch.setattr(dispatch, "_cpu_computes_natively", lambda _dtype: False)
    model = _small_model(fused=True).eval().bfloat16()
    x = torch.randn(2, 3, 64, 64).bfloat16()
    with torch.inference_mode():
        expected = model(x)
    errors = []

    def worker():
        try:
            with torch.inference_mode():
                for _ in range(5):
                    assert torch.equal(model(x), expected)
        except Exception as exc:  # reported below, with the model's state
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@needs_cpu_kernels
@pytest.mark.parametrize("layer_scale", [None, 0.5], ids=["no_layer_scale", "layer_scale"])
def test_cpu_inference_path_matches_reference(layer_scale, gemm_backend):
    """The inference-only path (fused blocks: projection + residual + LayerNorm ops, channels-last maps),
    which compare() does not take because it differentiates."""
    model = _small_model(layer_scale=layer_scale).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        expected_feats = model.forward_intermediates(x)
        gcvit.fuse(model)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        feats = model.forward_intermediates(x)
    for got, want in zip(feats, expected_feats):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_falls_back_with_one_warning_for_attention_dropout():
    model = _small_model(attn_drop_rate=0.1, fused=True).train()
    x = torch.randn(1, 3, 64, 64)
    dispatch._warned.clear()
    with warnings.catch_warnings(record=True) as caught, dispatch.use_backend("cpu"):
        warnings.simplefilter("always")
        model(x)
        model(x)
    messages = [str(w.message) for w in caught if "attention dropout" in str(w.message)]
    assert len(messages) == 1, messages


@needs_cpu_kernels
def test_cpu_inference_attention_refused_falls_back_with_the_qkv_bias(monkeypatch):
    """CPU fp32 inference computes qkv without its bias (the kernel adds it on load): when the kernel refuses a
    case, the reference attention must get qkv + bias, after one warning."""
    model = _small_model(fused=True).eval()
    reference = _small_model().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    dispatch.prepare(("cpu",))
    key = ("window_attention", "window_attention", "cpu", None)
    fused = dispatch._resolved[key]
    monkeypatch.setitem(dispatch._resolved, key, fused._replace(unsupported_reason=lambda *a: "refused by the test"))
    dispatch._warned.clear()
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(x)
        model(x)
        want = reference(x)
    assert len([w for w in caught if "refused by the test" in str(w.message)]) == 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_state_dict_identical_and_fuse_in_place():
    model = _small_model()
    keys = list(model.state_dict())
    assert gcvit.fuse(model) is model and model.fused
    assert list(model.state_dict()) == keys
    gcvit.fuse(model, False)
    assert not any(getattr(m, "fused", False) for m in model.modules())
    with pytest.raises(TypeError, match="patch_timm"):
        gcvit.fuse(torch.nn.Linear(2, 2))


@needs_cpu_kernels
def test_patch_timm_same_outputs_gradients_and_undo():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomise_(timm.create_model("gcvit_xxtiny", **SMALL))
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forward_before = model.stages[0].blocks[0]._window_attn.__func__
    x = torch.randn(2, 3, 64, 64)
    gcvit.patch_timm(model)
    assert model.stages[0].blocks[0]._window_attn.__func__ is not forward_before
    with warnings.catch_warnings(), dispatch.use_backend("cpu"):
        warnings.simplefilter("error")  # no fallback: the fused kernels really ran
        out = model(x)
    ref_out = reference(x)
    assert (out - ref_out).abs().max().item() <= 1e-4
    out.square().mean().backward()
    ref_out.square().mean().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        g = ref_params[name].grad
        assert (p.grad - g).abs().max().item() <= 1e-3 * max(1.0, g.abs().max().item()), name
    assert list(model.state_dict()) == list(state)
    gcvit.unpatch_timm(model)
    assert model.stages[0].blocks[0]._window_attn.__func__ is forward_before
    assert "forward" not in model.stages[0].global_block.blocks.conv1.__dict__
    with pytest.raises(TypeError, match="timm GlobalContextVit"):
        gcvit.patch_timm(gcvit.xxtiny(**SMALL))


@needs_cpu_kernels
def test_compile_fullgraph_of_fused_block_traces():
    model = _small_model(fused=True).eval()
    block, mbconv = model.stages[0].blocks[1], model.stages[0].global_block.blocks.conv1
    x = torch.randn(2, 16, 16, 64)
    global_query = torch.randn(2, 2, 2, 64)
    compiled_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled_mbconv = torch.compile(mbconv, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled_block(x, global_query), block(x, global_query), atol=1e-5)
        y = torch.randn(2, 64, 16, 16)
        assert torch.allclose(compiled_mbconv(y), mbconv(y), atol=1e-5)


# -- distributed: two CPU ranks with gloo vs one process on the same global batch ---------------------------

def _rank_main(rank, world, rendezvous_file, wrapper, backend, x, state, out_path):
    # a file rendezvous: a free TCP port picked up front can be taken by another process before rank 0 binds it
    dist.init_process_group(backend, init_method=f"file://{rendezvous_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        if device.type == "cpu":  # CPU training normally takes the reference path: exercise the C++ kernels
            dispatch.use_backend("cpu").__enter__()
        model = gcvit.create_model("xxtiny", fused=True, **SMALL)
        model.load_state_dict(state)
        model.to(device)
        shard = x.chunk(world)[rank].to(device)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
            wrapped(shard).square().mean().backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
        else:
            from torch.distributed.fsdp import fully_shard
            for stage in model.stages:
                fully_shard(stage)
            fully_shard(model)
            model(shard).square().mean().backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({n: g.cpu() for n, g in grads.items()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [
    pytest.param("gloo", marks=needs_cpu_kernels),
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA GPUs")),
])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_distributed_gradients_equal_single_process(tmp_path, wrapper, backend):
    model = _small_model(fused=True)
    state = model.state_dict()
    x = torch.randn(4, 3, 64, 64)
    # each rank averages over its half, DDP averages the ranks: the mean over the global batch
    model(x).square().mean().backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    out_path = tmp_path / "grads.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), wrapper, backend, x, state, str(out_path)), nprocs=2,
             join=True)
    grads = torch.load(out_path)
    for name, g in expected.items():
        assert (grads[name] - g).abs().max().item() <= 1e-4 * max(1.0, g.abs().max().item()), name


@needs_cpu_kernels
def test_inference_arena_reuses_blocks_and_restores_the_allocator():
    cpu.arena_empty_cache()
    with cpu.inference_arena():
        with cpu.inference_arena():  # nested: one installation
            block = torch.empty(1 << 20)  # 4 MiB
        del block
    held = cpu.arena_cached_bytes()
    assert held >= 4 << 20
    with cpu.inference_arena():
        again = torch.empty(1 << 20)  # the cached block, handed out again
    assert cpu.arena_cached_bytes() == held - (4 << 20)
    del again
    after = torch.empty(1 << 20)  # outside: the default allocator, nothing returns to the arena
    del after
    assert cpu.arena_cached_bytes() == held
    with pytest.raises(RuntimeError, match="inside"):
        with cpu.inference_arena():
            raise RuntimeError("inside")
    outside = torch.empty(1 << 20)
    del outside
    assert cpu.arena_cached_bytes() == held  # restored after the exception too
    cpu.arena_empty_cache()
    assert cpu.arena_cached_bytes() == 0


@needs_cpu_kernels
def test_inference_arena_limit_and_bad_setting(monkeypatch):
    ext = cpu.load()
    cpu.arena_empty_cache()
    try:
        ext.arena_set_limit(1 << 20)
        with cpu.inference_arena():
            big = torch.empty(1 << 20)  # 4 MiB: over the 1 MiB limit
        del big
        assert cpu.arena_cached_bytes() == 0
    finally:
        ext.arena_set_limit(cpu._arena_limit() << 20)
    monkeypatch.setattr(cpu, "_arena_limit_mb", None)
    monkeypatch.setenv("GCVIT_CPU_ARENA_MB", "lots")
    with pytest.raises(ValueError, match="GCVIT_CPU_ARENA_MB must be a whole number"):
        with cpu.inference_arena():
            pass
    monkeypatch.setenv("GCVIT_CPU_ARENA_MB", "0")
    monkeypatch.setattr(cpu, "_arena_limit_mb", None)
    with cpu.inference_arena():
        off = torch.empty(1 << 20)
    del off
    assert cpu.arena_cached_bytes() == 0
    monkeypatch.setattr(cpu, "_arena_limit_mb", None)
    monkeypatch.delenv("GCVIT_CPU_ARENA_MB")
    assert cpu._arena_limit() == 1024


@needs_cpu_kernels
def test_fused_cpu_inference_runs_in_the_arena_with_the_same_outputs(monkeypatch):
    """The arena only changes where memory comes from: same logits, also from 4 threads at once; training and
    the reference model do not use it."""
    import contextlib

    model = _small_model(fused=True).eval()
    x = torch.randn(2, 3, 64, 64)
    cpu.arena_empty_cache()
    with torch.inference_mode():
        y = model(x)
        assert cpu.arena_cached_bytes() > 0  # the forward's activations came from the arena
        results = [None] * 4

        def worker(i):
            with torch.inference_mode():
                results[i] = model(x)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.setattr(dispatch, "inference_arena", lambda model, x: contextlib.nullcontext())
        y_plain = model(x)
    for r in results:
        assert torch.equal(r, y)
    assert torch.equal(y, y_plain)
    monkeypatch.undo()
    assert isinstance(dispatch.inference_arena(model.train(), x), contextlib.nullcontext)
    assert isinstance(dispatch.inference_arena(_small_model().eval(), x), contextlib.nullcontext)


@needs_cpu_kernels
def test_frozen_weights_same_logits_and_follow_a_loaded_state_dict(gemm_backend):
    """gcvit.frozen_weights keeps the packed GEMM weights across forwards: the same logits as without it; a
    state_dict loaded inside the block (load_state_dict's in-place copies) gives the loaded model's logits; the
    packed copies are freed at exit."""
    model = _small_model(fused=True).eval()
    other = randomise_(gcvit.create_model("xxtiny", **SMALL, fused=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        y, y_other = model(x), other(x)
        with gcvit.frozen_weights():
            assert torch.equal(model(x), y) and torch.equal(model(x), y)
            assert cpu.frozen_weights_bytes() > 0  # at least the Fused-MBConv 1x1 weights (our pass on any backend)
            model.load_state_dict(other.state_dict())
            assert torch.equal(model(x), y_other)
    assert cpu.frozen_weights_bytes() == 0
