"""The MaskFormer model: backbones against their feature_info, layers against independent
computations (torch's own transformer layers, the sine formula), output structure, losses and
gradients, the fused switch, predict() sizes and values, and argument errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fastmaskformer
from fastmaskformer import MaskFormer, ops
from fastmaskformer.modeling import Backbone, PositionEmbeddingSine
from fastmaskformer.modeling.transformer import DecoderLayer, EncoderLayer

from tolerances import assert_close

K = 5
SMALL = dict(backbone="resnet18", num_queries=10, hidden_dim=64, mask_dim=64, conv_dim=64, nheads=4,
             dim_feedforward=128, dec_layers=3, test_topk_per_image=7)


def small_model(**overrides):
    return MaskFormer(K, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_model()


# ---------------------------------------------------------------------------------------- backbone
EXPECTED_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "swin_tiny_patch4_window7_224": (96, 192, 384, 768),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_backbone_feature_maps_match_feature_info(name):
    backbone = Backbone(name).eval()
    info = backbone.feature_info
    assert [(s.channels, s.stride) for s in info.values()] == list(zip(EXPECTED_CHANNELS[name], (4, 8, 16, 32)))
    H, W = (64, 96) if name.startswith("swin") else (64, 64)  # Swin: any multiple of 32, not just 224
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, H, W))
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    for n, f in feats.items():
        assert f.shape == (1, info[n].channels, H // info[n].stride, W // info[n].stride), n


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_loads_local_weights(tmp_path, suffix):
    full = timm.create_model("resnet18", pretrained=False)  # with its classifier, as published weights are
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(full.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(full.state_dict(), str(path))
    loaded = Backbone("resnet18", pretrained=str(path)).body.state_dict()
    reference = full.state_dict()
    assert loaded and all(torch.equal(v, reference[k]) for k, v in loaded.items())


def test_backbone_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Backbone("resnet18", pretrained=str(missing))
    with pytest.raises(ValueError, match="backbone: expected one of"):
        Backbone("vgg16")


# ---------------------------------------------------------------------------------------- layers
def test_position_encoding_matches_formula():
    h, w, F_ = 3, 5, 6
    pos = PositionEmbeddingSine(F_, normalize=True)(torch.zeros(2, 7, h, w))
    assert pos.shape == (1, 2 * F_, h, w)
    for c in range(2 * F_):
        i = c % F_
        freq = 10000 ** (2 * (i // 2) / F_)
        trig = math.sin if i % 2 == 0 else math.cos
        for y in range(h):
            for x in range(w):
                coord = (y + 1) / (h + 1e-6) if c < F_ else (x + 1) / (w + 1e-6)
                assert pos[0, c, y, x].item() == pytest.approx(trig(coord * 2 * math.pi / freq), abs=1e-5)


def _copy_common(ours, theirs):
    """Copies torch's layer's weights into ours (the FFN and attention names differ slightly)."""
    mapping = {"linear1": "ffn.linear1", "linear2": "ffn.linear2", "multihead_attn": "cross_attn"}
    state = {}
    for k, v in theirs.state_dict().items():
        head, _, rest = k.partition(".")
        state[f"{mapping.get(head, head)}.{rest}"] = v
    ours.load_state_dict(state)


def test_layers_without_positions_match_torch_post_norm_layers():
    d, nhead, ff = 16, 4, 32
    src, tgt = torch.randn(2, 7, d), torch.randn(2, 3, d)
    enc = EncoderLayer(d, nhead, ff).eval()
    torch_enc = nn.TransformerEncoderLayer(d, nhead, ff, batch_first=True).eval()
    _copy_common(enc, torch_enc)
    assert_close(enc(src), torch_enc(src), what="encoder layer")
    dec = DecoderLayer(d, nhead, ff).eval()
    torch_dec = nn.TransformerDecoderLayer(d, nhead, ff, batch_first=True).eval()
    _copy_common(dec, torch_dec)
    assert_close(dec(tgt, src), torch_dec(tgt, src), what="decoder layer")


def test_decoder_layer_adds_positions_to_queries_and_keys_only():
    d = 16
    layer = DecoderLayer(d, 4, 32).eval()
    tgt, memory, pos, qpos = torch.randn(2, 3, d), torch.randn(2, 7, d), torch.randn(1, 7, d), torch.randn(2, 3, d)
    x = layer.norm1(tgt + layer.self_attn(tgt + qpos, tgt + qpos, tgt)[0])
    x = layer.norm2(x + layer.cross_attn(x + qpos, memory + pos, memory)[0])
    x = layer.norm3(x + layer.ffn.linear2(torch.relu(layer.ffn.linear1(x))))
    assert_close(layer(tgt, memory, pos, qpos), x, what="decoder layer with positions")


# ---------------------------------------------------------------------------------------- model outputs
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(pixel_decoder="transformer_encoder", enc_layers=1),
    dict(enc_layers=1),
    dict(deep_supervision=False),
])
def test_output_shapes(overrides):
    model = small_model(**overrides)
    out = model(torch.rand(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 10, K + 1)
    assert out["pred_masks"].shape == (2, 10, 16, 24)
    if overrides.get("deep_supervision", True):
        assert len(out["aux_outputs"]) == SMALL["dec_layers"] - 1
        for aux in out["aux_outputs"]:
            assert aux["pred_logits"].shape == (2, 10, K + 1) and aux["pred_masks"].shape == (2, 10, 16, 24)
    else:
        assert "aux_outputs" not in out


def test_every_layer_output_goes_through_the_shared_norm_and_heads(model):
    """aux_outputs[i] / the final outputs = heads(final LayerNorm(decoder layer i's output)), with the mask
    logits an einsum against the pixel decoder's mask features."""
    model.eval()
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
             for i, layer in enumerate(model.transformer_decoder.decoder.layers)]
    hooks.append(model.pixel_decoder.register_forward_hook(lambda m, a, o: captured.__setitem__("mf", o[0])))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    per_layer = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    norm, head = model.transformer_decoder.decoder.norm, model.head
    for i, o in enumerate(per_layer):
        hs = norm(captured[i])
        assert_close(o["pred_logits"], head.class_embed(hs), what=f"class logits of layer {i}")
        assert_close(o["pred_masks"], torch.einsum("bqc,bchw->bqhw", head.mask_embed(hs), captured["mf"]),
                     what=f"mask logits of layer {i}")


@pytest.mark.parametrize("overrides, top_in, count, digest", [
    (dict(), 512, 211, "7b59148092abee38eab661d994d8718dc5f32ef4"),
    (dict(pixel_decoder="transformer_encoder", enc_layers=1), 64, 223, "da940297705404cb0d65038a2e848abaead1ebad"),
])
def test_state_dict_keys_are_pinned(overrides, top_in, count, digest):
    """Checkpoint converters rely on these names: the keys, their order and shapes are those of the
    MaskFormer before the family refactor (digest of [(key, shape), ...])."""
    import hashlib
    sd = small_model(**overrides).state_dict()
    for key, shape in [("backbone.body.conv1.weight", (64, 3, 7, 7)), ("pixel_decoder.top_conv.0.weight", (64, top_in, 3, 3)),
                       ("pixel_decoder.lateral_convs.2.1.bias", (64,)), ("pixel_decoder.mask_features.weight", (64, 64, 3, 3)),
                       ("transformer_decoder.decoder.layers.2.cross_attn.in_proj_weight", (192, 64)),
                       ("transformer_decoder.decoder.norm.weight", (64,)), ("transformer_decoder.query_embed.weight", (10, 64)),
                       ("head.class_embed.weight", (K + 1, 64)), ("head.mask_embed.layers.2.bias", (64,)),
                       ("criterion.empty_weight", (K + 1,))]:
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == count
    assert hashlib.sha1(repr([(k, tuple(v.shape)) for k, v in sd.items()]).encode()).hexdigest() == digest


def test_predict_runs_semantic_op_once_per_batch(model, monkeypatch):
    calls = []
    original = ops.semantic_inference
    monkeypatch.setattr(ops, "semantic_inference", lambda *a, **k: calls.append(tuple(a[0].shape)) or original(*a, **k))
    out = model.predict([torch.rand(3, 40, 50), torch.rand(3, 20, 30)], "semantic")
    assert calls == [(2, 10, K + 1)]
    assert out[0]["sem_seg"].shape == (K, 40, 50) and out[1]["sem_seg"].shape == (K, 20, 30)


@pytest.mark.parametrize("num_classes, overrides, paper", [
    (150, dict(), 41e6),  # R50, ADE20K-150 (Table 1 of the paper)
    (133, dict(pixel_decoder="transformer_encoder", enc_layers=6), 45e6),  # R50, COCO panoptic
])
def test_parameter_count_matches_paper(num_classes, overrides, paper):
    model = MaskFormer(num_classes, backbone="resnet50", **overrides)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper) < 1.5e6, n


def test_low_precision_inputs_and_autocast(model):
    model.eval()
    with torch.no_grad():
        ref = model(torch.full((1, 3, 64, 64), 0.5))
        half = model(torch.full((1, 3, 64, 64), 0.5, dtype=torch.float16))
        assert_close(half["pred_logits"], ref["pred_logits"], what="fp16 image")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.full((1, 3, 64, 64), 0.5))
    assert out["pred_masks"].dtype == torch.bfloat16 and out["pred_masks"].shape == (1, 10, 16, 16)
    assert torch.isfinite(out["pred_masks"].float()).all()


# ---------------------------------------------------------------------------------------- training
def _targets(H, W):
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, :20, :30] = True
    masks[1, 30:, 10:] = True
    return [{"labels": torch.tensor([1, 3]), "masks": masks},
            {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W, dtype=torch.bool)}]


def test_loss_is_weighted_and_reaches_every_parameter():
    model = small_model(pixel_decoder="transformer_encoder", enc_layers=1).train()
    out = model(torch.rand(2, 3, 64, 64))
    targets = _targets(64, 64)
    losses = model.loss(out, targets)
    base = {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
    expected_w = {**base, **{f"{k}_{i}": v for i in range(SMALL["dec_layers"] - 1) for k, v in base.items()}}
    assert model.criterion.weight_dict == expected_w and set(losses) == set(expected_w)
    raw = model.criterion(out, targets)
    for k, v in losses.items():
        assert_close(v, raw[k] * expected_w[k], what=k)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Some gradients are exactly zero at initialization by design (timm zero-initializes the last
    # BatchNorm of each residual block; the first decoder self-attention sees all-zero queries), but
    # every part of the model must receive a signal.
    for name, part in model.named_children():
        grads = [p.grad.abs().sum() for p in part.parameters()]
        assert not grads or sum(grads) > 0, name


def test_fused_switches_model_matcher_and_criterion(monkeypatch):
    model = small_model(dec_layers=2)
    assert not model.fused and not model.matcher.fused and not model.criterion.fused
    seen = []
    original = ops.mask_logits

    def spy(*args, backend="reference", **kwargs):
        seen.append(backend)
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops, "mask_logits", spy)
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.fused = True
        assert model.matcher.fused and model.criterion.fused and model.criterion.matcher is model.matcher
        fused = model(x)
    assert seen == [ops.backend_for(False), ops.backend_for(True)] == ["reference", "auto"]
    assert_close(fused["pred_masks"], ref["pred_masks"], what="fused mask logits")
    assert small_model(fused=True).criterion.fused


# ---------------------------------------------------------------------------------------- predict
def test_predict_sizes_for_odd_inputs(model):
    model.train()
    images = torch.rand(2, 3, 70, 90)
    sem = model.predict(images, "semantic")
    pan = model.predict(images, "panoptic")
    ins = model.predict(images, "instance")
    assert model.training  # predict() restores the mode it found
    assert len(sem) == len(pan) == len(ins) == 2
    for s, p, i in zip(sem, pan, ins):
        assert s["sem_seg"].shape == (K, 70, 90)
        seg, info = p["panoptic_seg"]
        assert seg.shape == (70, 90) and seg.dtype == torch.int32 and isinstance(info, list)
        n = len(i["scores"])
        assert n == SMALL["test_topk_per_image"] and i["labels"].shape == (n,) and i["masks"].shape == (n, 70, 90)
    mixed = model.predict([torch.rand(3, 70, 90), torch.rand(3, 33, 40)], "instance")
    assert mixed[0]["masks"].shape[1:] == (70, 90) and mixed[1]["masks"].shape[1:] == (33, 40)
    assert model.predict(torch.rand(0, 3, 64, 64)) == []


def test_predict_semantic_matches_manual_pipeline(model):
    """Pad with the mean colour (zero after normalization) to 96x96, forward, upsample, crop, and
    combine classes and masks: all by hand."""
    image = torch.rand(1, 3, 90, 70).transpose(2, 3)  # non-contiguous
    padded = model.pixel_mean.expand(1, 3, 96, 96).clone()
    padded[..., :70, :90] = image
    model.eval()
    with torch.no_grad():
        out = model(padded)
    masks = F.interpolate(out["pred_masks"], size=(96, 96), mode="bilinear", align_corners=False)[..., :70, :90]
    expected = torch.einsum("qk,qhw->khw", out["pred_logits"][0].softmax(-1)[:, :-1], masks[0].sigmoid())
    assert_close(model.predict(image, "semantic")[0]["sem_seg"], expected, what="predicted semantic scores")


# ---------------------------------------------------------------------------------------- bad input
def test_bad_images_raise_clear_errors(model):
    with pytest.raises(ValueError, match="images: expected a 4-d"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(TypeError, match="images: expected dtype"):
        model(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="size_divisibility=32, got 70x90"):
        model(torch.rand(1, 3, 70, 90))
    with pytest.raises(ValueError, match="meta"):
        model(torch.rand(1, 3, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="task"):
        model.predict(torch.rand(1, 3, 64, 64), task="depth")
    with pytest.raises(TypeError, match="images"):
        model.predict("image.png")
    with pytest.raises(ValueError, match="images\\[1\\]: expected 3 \\(RGB\\)"):
        model.predict([torch.rand(3, 8, 8), torch.rand(4, 8, 8)])


@pytest.mark.parametrize("overrides, match", [
    (dict(pixel_decoder="fpn"), "pixel_decoder"),
    (dict(conv_dim=48), "conv_dim"),
    (dict(pixel_decoder="transformer_encoder", enc_layers=0), "enc_layers"),
    (dict(num_queries=0), "num_queries"),
    (dict(pixel_mean=(0.5, 0.5)), "pixel_mean"),
])
def test_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_model(**overrides)


def test_package_exports():
    assert fastmaskformer.MaskFormer is MaskFormer
