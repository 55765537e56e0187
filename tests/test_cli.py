"""python -m gcvit: list, bench, check, and clear errors."""
import json

import pytest

from gcvit.__main__ import main


def test_list_shows_every_variant(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("xxtiny", "tiny2", "small2", "large_384", "large_512"):
        assert f"\n{name} " in out
    assert "28.22" in out  # tiny's parameters (M), measured


def test_bench_reference_and_fused_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "xxtiny", "--img-size", "64", "--batch", "1", "--iters", "2", "--warmup", "1",
            "--quiet", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fused / reference" in out and "img/s" in out and "p99" in out
    results = json.loads(path.read_text())["results"]
    for impl in ("reference", "fused"):
        assert results[impl]["images_per_s"] > 0 and results[impl]["iters"] == 2


def test_bench_frozen_weights(tmp_path, capsys, monkeypatch):
    """--frozen-weights times the fused model inside gcvit.frozen_weights and says so in the JSON."""
    import gcvit

    entered = []
    real = gcvit.frozen_weights
    monkeypatch.setattr(gcvit, "frozen_weights", lambda: entered.append(1) or real())
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "xxtiny", "--img-size", "64", "--batch", "1", "--iters", "2", "--warmup", "1",
            "--impl", "fused", "--frozen-weights", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    assert entered == [1] and data["frozen_weights"] is True and data["results"]["fused"]["images_per_s"] > 0


def test_bench_train_step(capsys):
    argv = ["bench", "--model", "xxtiny", "--img-size", "64", "--batch", "2", "--iters", "1", "--warmup", "0",
            "--mode", "train", "--impl", "reference", "--quiet"]
    assert main(argv) == 0
    assert "train" in capsys.readouterr().out


def test_check_passes_on_this_machine(capsys):
    assert main(["check", "--model", "xxtiny", "--img-size", "64", "--batch", "2"]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["bench", "--model", "huge"], "unknown GC ViT variant"),
    (["bench", "--device", "tpu"], "unknown device"),
    (["bench", "--dtype", "fp8"], "unknown dtype"),
    (["bench", "--device", "cpu", "--dtype", "fp16"], "fp16 is not supported on the CPU"),
    (["check", "--img-size", "200"], "cannot tile"),
])
def test_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
