"""CI smoke test of the model benchmark suite (benchmarks/test_bench_model.py), its session JSON
(benchmarks/conftest.py) and the renderer (benchmarks/results/render.py).

It runs the real benchmark file with pytest at the tiny shape (``GCVIT_BENCH_TINY=1``: GC ViT-XXT at 64x64 with
2x2 windows, batch 1, one timed round; reference and fused, inference and a training step, Swin-T eager),
checks the JSON it writes (every case measured, speed-ups consistent with the interleaved samples, the fused
path either ran or says why not), renders it to markdown and PNG, and checks that a ``--benchmark-disable`` run
writes no JSON. The test marked slow (``pytest -m slow``) does the same for the compiled modes and ONNX
Runtime (``GCVIT_BENCH_TINY=all``).
"""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_FILE = os.path.join(ROOT, "benchmarks", "test_bench_model.py")
RENDER_FILE = os.path.join(ROOT, "benchmarks", "results", "render.py")


def _run_benchmarks(monkeypatch, tiny: str, *args: str) -> int:
    """pytest on the benchmark file in this process (env switch set; importlib mode keeps module names apart)."""
    monkeypatch.setenv("GCVIT_BENCH_TINY", tiny)
    monkeypatch.setenv("GCVIT_BENCH_DEVICE", "cpu")
    for name in ("GCVIT_BENCH_FULL", "GCVIT_BENCH_OUT", "GCVIT_BENCH_ROUNDS", "GCVIT_BENCH_ITERS",
                 "GCVIT_BENCH_WARMUP", "GCVIT_BENCH_COMPILE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    return int(pytest.main([BENCH_FILE, "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                            "-W", "ignore::pytest.PytestWarning", *args]))


def _render_module():
    spec = importlib.util.spec_from_file_location("gcvit_bench_render", RENDER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_results(doc, expected_modes):
    assert doc["device"]["type"] == "cpu" and doc["device"]["name"].startswith("cpu-")
    assert doc["versions"]["torch"] and doc["git"]["commit"] and isinstance(doc["git"]["dirty"], bool)
    assert doc["wall_s"] > 0
    results = {r["id"]: r for r in doc["results"]}
    assert sorted(r["mode"] for r in doc["results"]) == sorted(expected_modes), results.keys()
    for r in doc["results"]:
        assert r["status"] == "ok", (r["id"], r.get("reason"), r.get("traceback"))
        assert r["measured"] is True
        assert r["steps"] == len(r["samples_ms"]) == 1
        assert r["images_per_s"] > 0 and r["latency_ms_p50"] > 0 and r["peak_memory_mb"] > 0
        assert abs(r["images_per_s"] - r["batch"] / (r["samples_ms"][0] / 1e3)) < 1e-3 * r["images_per_s"]
        reference_id = f"{r['group']}/reference"
        assert reference_id in results, f"{r['id']}: its group's reference eager case did not run"
        if r["mode"] == "reference":
            assert r["speedup_vs_reference"] == 1.0 and r["reference_samples_ms"] == []
        else:
            # the interleaved reference round really ran, and the speed-up is computed from the two samples
            assert len(r["reference_samples_ms"]) == 1
            expected = r["reference_samples_ms"][0] / r["samples_ms"][0]
            assert r["speedup_vs_reference"] == pytest.approx(expected, rel=1e-3)
        if r["impl"] == "fused":
            assert isinstance(r["fused_path_ran"], bool)
            if "/train/" in r["group"]:
                # by design: a CPU forward that will be differentiated takes the reference (gcvit/dispatch.py)
                assert not r["fused_path_ran"], r["fused_ops_per_step"]
            elif r["fused_path_ran"]:
                assert any(op.startswith("gcvit::") for op in r["fused_ops_per_step"]), r["fused_ops_per_step"]
            else:  # a fallback to the reference math must say why
                assert r["gcvit_warnings"], f"{r['id']}: fused path did not run and no warning says why"
    return results


def _check_render(path, tmp_path, expected_modes):
    render = _render_module()
    out = tmp_path / "rendered"
    md_path, png_path = render.render(str(path), str(out))
    name = os.path.splitext(os.path.basename(path))[0]
    assert os.path.basename(md_path) == name + ".md" and os.path.basename(png_path) == name + ".png"
    md = open(md_path).read()
    assert "speed-up vs reference eager" in md and "cpu-" in md
    for mode in expected_modes:
        assert f"| {mode} |" in md, mode
    with open(png_path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png_path) > 5000
    # the command line too
    assert render.main([str(path), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / (name + ".md")).read_text() == md


TINY_MODES = ["reference", "fused", "fused-frozen-weights", "gemm-floor", "swin_tiny_patch4_window7_224", "reference",
              "fused"]


def test_benchmark_suite_tiny_shape(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    assert _run_benchmarks(monkeypatch, "1", "--benchmark-only", f"--gcvit-bench-out={out}") == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["grid"] == "tiny" and doc["exit_status"] == 0 and doc["complete"] is True
    assert set(doc["summary"]) == {r["group"] for r in doc["results"]}
    results = _check_results(doc, TINY_MODES)
    assert {r["task"] for r in results.values()} == {"infer", "train"}
    _check_render(out, tmp_path, set(TINY_MODES))

    # a --benchmark-disable smoke run measures nothing, so it must write no results file
    quiet_dir = tmp_path / "disabled"
    quiet_dir.mkdir()
    assert _run_benchmarks(monkeypatch, "1", "--benchmark-disable", f"--gcvit-bench-out={quiet_dir}",
                           "-k", "xxtiny/infer/b1/64/fp32/reference") == 0
    assert list(quiet_dir.iterdir()) == []


def test_render_rejects_non_results_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="not a gcvit benchmark results file"):
        _render_module().render(str(bad), str(tmp_path))


@pytest.mark.slow
def test_benchmark_suite_tiny_shape_compiled_and_onnxruntime(tmp_path, monkeypatch):
    out = tmp_path / "results-all.json"
    code = _run_benchmarks(monkeypatch, "all", "--benchmark-only", f"--gcvit-bench-out={out}")
    doc = json.loads(out.read_text())
    modes = ["reference", "fused", "compile-reference", "compile-fused", "onnxruntime-reference",
             "compile-frozen-reference", "compile-swin_tiny_patch4_window7_224",
             "reference", "compile-reference", "compile-fused"]
    skipped = [r for r in doc["results"] if r["status"] == "skipped"]
    assert code == 0, [(r["id"], r.get("reason")) for r in doc["results"] if r["status"] != "ok"]
    # an ONNX export failure is a recorded skip with its reason, never a silent pass
    assert all(r["mode"] == "onnxruntime-reference" and r["reason"] for r in skipped), skipped
    ok_doc = dict(doc, results=[r for r in doc["results"] if r["status"] == "ok"])
    _check_results(ok_doc, [m for m in modes if m not in {r["mode"] for r in skipped}])
    for r in ok_doc["results"]:
        if r["compiled"]:
            assert r["dynamo_graphs"] >= 1, r["id"]
    _check_render(out, tmp_path, {r["mode"] for r in ok_doc["results"]})
