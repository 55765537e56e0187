"""Checkpoint loading: timm layout, official NVlabs layout, nesting, and all-or-nothing failures."""
import re

import pytest
import torch

import gcvit
from gcvit.checkpoint import CheckpointError


def _to_official(state):
    """Rename a timm-layout xxtiny state_dict to the NVlabs/GCVit naming, written independently of the loader:
    levels.*, q_global_gen, Linear SE layers, gamma1/2, downsample at the end of the previous level."""
    out = {}
    mbconv = {"conv_dw": "conv.0", "se.fc1": "conv.2.fc.0", "se.fc2": "conv.2.fc.2", "conv_pw": "conv.3"}

    def block(prefix, rest):
        part, leaf = rest.rsplit(".", 1)
        return f"{prefix}{mbconv[part]}.{leaf}"

    for key, value in state.items():
        if key.endswith(("se.fc1.weight", "se.fc2.weight")):
            value = value.flatten(1)
        if key.startswith("stem.conv1."):
            new = key.replace("stem.conv1.", "patch_embed.proj.")
        elif key.startswith("stem.down.conv_block."):
            new = block("patch_embed.conv_down.", key[len("stem.down.conv_block."):])
        elif key.startswith("stem.down."):
            new = key.replace("stem.down.", "patch_embed.conv_down.")
        elif m := re.match(r"stages\.(\d)\.downsample\.conv_block\.(.*)", key):
            new = block(f"levels.{int(m[1]) - 1}.downsample.", m[2])
        elif m := re.match(r"stages\.(\d)\.downsample\.(.*)", key):
            new = f"levels.{int(m[1]) - 1}.downsample.{m[2]}"
        elif m := re.match(r"stages\.(\d)\.global_block\.blocks\.conv(\d)\.(.*)", key):
            new = block(f"levels.{m[1]}.q_global_gen.to_q_global.{int(m[2]) - 1}.", m[3])
        elif m := re.match(r"stages\.(\d)\.blocks\.(\d+)\.(.*)", key):
            rest = m[3].replace("attn.rel_pos.", "attn.").replace("ls1.gamma", "gamma1").replace("ls2.gamma", "gamma2")
            new = f"levels.{m[1]}.blocks.{m[2]}.{rest}"
        elif key.startswith("stages.3.norm."):
            new = key.replace("stages.3.norm.", "norm.")
        elif key.startswith("head.fc."):
            new = key.replace("head.fc.", "head.")
        else:
            raise AssertionError(f"unmapped key {key}")
        out[new] = value
    # the official code stores the index buffers; the loader must drop them
    for key in list(out):
        if key.endswith("relative_position_bias_table"):
            out[key.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return out


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = gcvit.create_model("xxtiny", img_size=64, window_size=2, layer_scale=0.5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return model.state_dict(), x, model(x)


def _fresh():
    return gcvit.create_model("xxtiny", img_size=64, window_size=2, layer_scale=0.5).eval()


def _assert_loaded(model, x, expected):
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".safetensors"])
def test_timm_layout_files(tmp_path, source, suffix):
    state, x, expected = source
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    _assert_loaded(gcvit.load_checkpoint(_fresh(), path), x, expected)
    model = gcvit.create_model("xxtiny", img_size=64, window_size=2, layer_scale=0.5, checkpoint_path=str(path))
    _assert_loaded(model.eval(), x, expected)


@pytest.mark.parametrize("nesting", ["state_dict", "model", "ema", "ddp"])
def test_official_layout_and_nesting(tmp_path, source, nesting):
    state, x, expected = source
    official = _to_official(state)
    assert not any(k.startswith("stages.") for k in official)
    if nesting == "ema":
        # a training checkpoint: state_dict holds other (non-EMA) weights; use_ema picks the EMA ones
        noise = {k: v + 1 for k, v in official.items()}
        obj = {"state_dict": noise, "state_dict_ema": official, "epoch": 3}
    elif nesting == "ddp":
        obj = {"state_dict": {"module." + k: v for k, v in official.items()}}
    else:
        obj = {nesting: official, "optimizer": {}}
    path = tmp_path / "official.pth.tar"
    torch.save(obj, path)
    model = gcvit.load_checkpoint(_fresh(), path, use_ema=(nesting == "ema"))
    _assert_loaded(model, x, expected)


def _unchanged_after(error_match, path):
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((CheckpointError, FileNotFoundError), match=error_match):
        gcvit.load_checkpoint(model, path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_file_errors_and_leaves_model(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source[0], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _unchanged_after("could not read checkpoint", path)


def test_wrong_variant_errors_and_leaves_model(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(gcvit.create_model("xtiny", img_size=64, window_size=2).state_dict(), path)
    _unchanged_after("unexpected keys", path)


def test_missing_key_and_shape_mismatch_are_listed(tmp_path, source):
    state = dict(source[0])
    del state["stages.2.blocks.1.attn.qkv.weight"]
    state["head.fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    _unchanged_after(r"1 missing keys: stages\.2\.blocks\.1\.attn\.qkv\.weight.*1 shape mismatches: head\.fc\.weight",
                     path)


def test_missing_file_and_non_state_dict(tmp_path):
    _unchanged_after("does not exist", tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    _unchanged_after("not a state_dict", path)
