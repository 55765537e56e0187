"""The reference model: variants, equivalence with timm, input sizes, bad input, feature pyramid."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gcvit
from gcvit.check import randomise_
from gcvit.variants import VARIANTS

timm = pytest.importorskip("timm")

def _meta_model(name, **kw):
    with torch.device("meta"):
        return gcvit.create_model(name, **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_count_matches_official_and_published(name):
    variant = VARIANTS[name]
    named = dict(_meta_model(name).named_parameters())
    assert sum(p.numel() for p in named.values()) == variant.official_params  # the official code's exact count
    # The published table rounds inconsistently (34.54M -> 34, 11.995M -> 12) and gives large 201M at every
    # resolution, though the relative-position tables grow with the window: compare without them, within 1.1M.
    no_tables = sum(p.numel() for k, p in named.items() if "relative_position_bias_table" not in k)
    assert abs(no_tables / 1e6 - variant.published_params_m) < 1.1


# Measured here (multiply-adds, torch.utils.flop_counter): xtiny 2.91 vs published 2.6, tiny2 6.18 vs 5.5,
# small2 11.54 vs 10.7, large_384 103.9 vs 120.4, large_512 202.1 vs 245.0. These models have exactly the
# official code's parameters and match it output for output, and a by-hand count agrees with the counter
# (xtiny = tiny minus 13 stage-3 blocks of ~0.148 GMACs = 2.84 + attention), so the published figures for
# these five cannot come from the published configurations. Strict xfail: a fix elsewhere shows up here.
_GFLOPS_INCONSISTENT = {"xtiny", "tiny2", "small2", "large_384", "large_512"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="published GFLOPs inconsistent with the config"))
    if n in _GFLOPS_INCONSISTENT else n for n in VARIANTS])
def test_gflops_within_5_percent_of_published(name):
    model = _meta_model(name).eval()
    size = VARIANTS[name].img_size
    x = torch.empty(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    gmacs = counter.get_total_flops() / 2 / 1e9  # GC ViT counts multiply-adds
    published = VARIANTS[name].published_gflops
    assert abs(gmacs - published) / published < 0.05, (gmacs, published)


def _timm_pair(name, img_size=224, batch=2, **kw):
    theirs = timm.create_model(VARIANTS[name].timm_name, img_size=img_size, **kw)
    ours = gcvit.create_model(name, img_size=img_size, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name,img_size", [("xxtiny", 224), ("tiny", 224), ("xxtiny", 256), ("xxtiny", 288),
                                           ("xxtiny", (320, 192))])
def test_matches_timm_outputs_and_gradients(name, img_size):
    ours, theirs = _timm_pair(name, img_size)
    randomise_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(3, 3, h, w)
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - out_theirs).abs().max().item() <= 1e-4
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    theirs_params = dict(theirs.named_parameters())
    for pname, p in ours.named_parameters():
        q = theirs_params[pname]
        tol = 1e-4 * max(1.0, q.grad.abs().max().item())
        assert (p.grad - q.grad).abs().max().item() <= tol, pname


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xtiny", "small", "base"])
def test_matches_timm_larger_variants(name):
    ours, theirs = _timm_pair(name)
    randomise_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-4


def test_each_image_global_query_reaches_only_its_windows():
    model = gcvit.xxtiny().eval()
    randomise_(model)
    x = torch.randn(3, 3, 224, 224)
    x2 = x.clone()
    x2[1] = torch.randn(3, 224, 224)  # change image 1 only
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-5)
    assert not torch.allclose(a[1], b[1], atol=1e-3)
    # and the batch result equals per-image results
    with torch.no_grad():
        singles = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(a, singles, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=200), "cannot tile"),
    (dict(img_size=224, window_size=6), "cannot tile"),
    (dict(img_size=192, window_size=(16, 6, 6, 6)), "global query"),
])
def test_untileable_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gcvit.create_model("xxtiny", **kwargs)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(1, 4, 224, 224), ValueError, "3 input channels"),
    (torch.randn(3, 224, 224), ValueError, "4-D"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(1, 3, 256, 256), ValueError, "built for 224x224"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_bad_input_raises_clear_error(x, error, match, fused):
    model = _meta_model("xxtiny").set_fused(fused)
    if isinstance(x, torch.Tensor):
        x = x.to("meta")
    with pytest.raises(error, match=match):
        model(x)


def test_factories_and_overrides():
    assert gcvit.list_models() == ["xxtiny", "xtiny", "tiny", "tiny2", "small", "small2", "base", "large",
                                   "large_384", "large_512"]
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10, in_chans=1, img_size=64, window_size=2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    assert gcvit.create_model("gc_vit_large_512_21k", fused=False).__class__ is gcvit.GlobalContextVit
    with pytest.raises(ValueError, match="unknown GC ViT variant"):
        gcvit.create_model("huge")
    with pytest.raises(TypeError, match="unknown argument"):
        gcvit.create_model("tiny", window_sz=7)
    large_384 = _meta_model("large_384")
    assert large_384.window_size == ((12, 12), (12, 12), (24, 24), (12, 12))
    assert _meta_model("large_512").window_size == ((16, 16), (16, 16), (32, 32), (16, 16))


def test_feature_pyramid_matches_timm_features_only():
    ours = gcvit.create_model("xxtiny", features_only=True)
    theirs = timm.create_model("gcvit_xxtiny", features_only=True)
    theirs_sd = theirs.state_dict()
    ours.load_state_dict({k: theirs_sd[k.replace("stages.", "stages_", 1)] for k in ours.state_dict()})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats, ref = ours(x), theirs(x)
    assert [f.shape[1:] for f in feats] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    for a, b in zip(feats, ref):
        assert (a - b).abs().max().item() <= 1e-4
    assert [f.shape[1] for f in gcvit.create_model("xxtiny", features_only=True, out_indices=(1, 3))(x)] == [128, 512]
