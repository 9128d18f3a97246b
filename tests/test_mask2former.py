"""The Mask2Former model: output structure and sizes, parameter counts, the deformable pixel decoder
(official initialization, reference points, a layer against an explicit sampling loop, fp32 under
autocast), the masked-attention decoder (level order, masks as the official rule computes them from
the previous prediction, fully blocked rows, detached masks, attention against torch's MHA),
gradients, the fused switch, predict(), loading and argument errors."""
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaskformer
from fastmaskformer import Mask2Former, ops
from fastmaskformer.modeling import MaskClassificationModel, MaskFormer
from fastmaskformer.modeling.masked_attention_decoder import MaskedAttentionLayer, attention_mask
from fastmaskformer.modeling.msdeform_pixel_decoder import MSDeformAttn, reference_points

import independent_points as ind
from tolerances import assert_close

K = 5
TINY = dict(backbone="resnet18", num_queries=6, hidden_dim=64, mask_dim=32, conv_dim=64, nheads=4,
            dim_feedforward=64, dec_layers=4, enc_layers=1, enc_nheads=4, enc_n_points=2, enc_dim_feedforward=64,
            test_topk_per_image=7)


def tiny_model(**overrides):
    return Mask2Former(K, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model().eval()


# ---------------------------------------------------------------------------------------- structure
def test_output_shapes_and_aux_count(model):
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 6, K + 1) and out["pred_masks"].shape == (2, 6, 16, 24)
    assert len(out["aux_outputs"]) == TINY["dec_layers"]  # the initial queries and every layer but the last
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, K + 1) and aux["pred_masks"].shape == (2, 6, 16, 24)
    assert "aux_outputs" not in tiny_model(deep_supervision=False)(torch.rand(1, 3, 64, 64))


def test_family_shares_base_and_weighting():
    m = tiny_model()
    assert isinstance(m, MaskClassificationModel) and issubclass(MaskFormer, MaskClassificationModel)
    assert Mask2Former.predict is MaskFormer.predict and Mask2Former._postprocess is MaskFormer._postprocess
    base = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    expected = {**base, **{f"{k}_{i}": v for i in range(TINY["dec_layers"]) for k, v in base.items()}}
    assert m.criterion.weight_dict == expected
    assert m.matcher.cost_class == 2.0 and m.matcher.cost_mask == 5.0 and m.matcher.cost_dice == 5.0
    assert m.criterion.eos_coef == 0.1 and m.criterion.matcher is m.matcher


def test_parameter_count_r50_matches_official():
    n = sum(p.numel() for p in Mask2Former(150, backbone="resnet50").parameters())
    assert abs(n - 44.0e6) < 1e6, n  # Hugging Face's Mask2Former R50 counts 44.04M


# ---------------------------------------------------------------------------------------- pixel decoder
def test_msdeformattn_official_initialization():
    attn = MSDeformAttn(32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    for m in range(8):
        c, s = math.cos(2 * math.pi * m / 8), math.sin(2 * math.pi * m / 8)
        unit = torch.tensor([c, s]) / max(abs(c), abs(s))
        for p in range(4):
            for lvl in range(3):
                assert_close(bias[m, lvl, p], unit * (p + 1), what=f"offset bias head {m} point {p}")
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()  # uniform attention over levels x points at start


def test_reference_points_are_normalized_pixel_centres():
    ref = reference_points(((2, 3), (1, 2)), torch.device("cpu"))
    expected = [[(j + 0.5) / 3, (i + 0.5) / 2] for i in range(2) for j in range(3)] + [[0.25, 0.5], [0.75, 0.5]]
    assert ref.shape == (1, 8, 1, 2)
    assert_close(ref[0, :, 0], torch.tensor(expected), what="reference points")


def test_msdeformattn_layer_matches_explicit_sampling():
    """The module's projections, softmax over levels x points, locations = reference + offset / (w, h),
    and bilinear sampling, all recomputed by hand on tiny random weights."""
    torch.manual_seed(1)
    attn = MSDeformAttn(8, n_levels=2, n_heads=2, n_points=2)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.5)
    shapes = ((3, 2), (1, 3))
    query, value = torch.randn(1, 9, 8), torch.randn(1, 9, 8)
    ref = reference_points(shapes, torch.device("cpu"))
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    out = attn(query, ref, value, shapes, torch.tensor([0, 6]), normalizer)
    q, v = query.double().numpy()[0], value.double().numpy()[0]
    W = {n: p.detach().double().numpy() for n, p in attn.named_parameters()}
    vp = (v @ W["value_proj.weight"].T + W["value_proj.bias"]).reshape(9, 2, 4)
    off = (q @ W["sampling_offsets.weight"].T + W["sampling_offsets.bias"]).reshape(9, 2, 2, 2, 2)
    logit = (q @ W["attention_weights.weight"].T + W["attention_weights.bias"]).reshape(9, 2, 4)
    aw = (np.exp(logit) / np.exp(logit).sum(-1, keepdims=True)).reshape(9, 2, 2, 2)
    loc = ref.double().numpy()[0, :, None, :, None, :] + off / np.array([[2, 3], [3, 1]])[None, None, :, None, :]
    sampled = ind.ms_deform_attn(vp[None], shapes, loc[None], aw[None])[0]
    expected = sampled @ W["output_proj.weight"].T + W["output_proj.bias"]
    assert_close(out[0], torch.from_numpy(expected), what="MSDeformAttn layer")


def test_pixel_decoder_levels_and_fp32_under_autocast(model):
    feats = {k: v.bfloat16() for k, v in model.backbone(torch.rand(2, 3, 64, 96)).items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, levels = model.pixel_decoder(feats)
    assert mask_features.shape == (2, TINY["mask_dim"], 16, 24) and mask_features.dtype == torch.float32
    assert [tuple(x.shape[-2:]) for x in levels] == [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8: coarsest first
    assert all(x.dtype == torch.float32 and x.shape[1] == TINY["conv_dim"] for x in levels)


# ---------------------------------------------------------------------------------------- masked attention
def test_attention_matches_torch_mha_with_per_head_mask():
    torch.manual_seed(2)
    layer = MaskedAttentionLayer(16, 4, 32).eval()
    tgt, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    pos, qpos = torch.randn(1, 7, 16), torch.randn(1, 3, 16)
    allowed = torch.rand(2, 1, 3, 7) > 0.4
    allowed[:, :, :, 0] = True
    blocked = (~allowed[:, 0]).repeat_interleave(4, 0)  # torch's MHA: [B*heads, Q, S], True = blocked
    x = layer.norm1(tgt + layer.cross_attn(tgt + qpos, memory + pos, memory, attn_mask=blocked)[0])
    x = layer.norm2(x + layer.self_attn(x + qpos, x + qpos, x)[0])
    x = layer.norm3(x + layer.ffn.linear2(torch.relu(layer.ffn.linear1(x))))
    assert_close(layer(tgt, memory, pos, qpos, allowed), x, what="masked decoder layer")


def test_fully_blocked_rows_attend_everywhere():
    feats = torch.randn(1, 4, 3, 3)
    embed = torch.zeros(1, 2, 4)
    feats[0, 0] = 1.0
    embed[0, 0, 0] = -5.0  # query 0: logits -5 everywhere -> every pixel blocked -> row unblocked
    embed[0, 1, 0] = 5.0  # query 1: logits +5 everywhere -> every pixel allowed
    mask = attention_mask(embed, feats)
    assert mask.shape == (1, 1, 2, 9) and mask.all()
    embed[0, 1, 0] = 0.0
    embed[0, 1, 1] = 1.0
    mask = attention_mask(embed, feats)
    assert torch.equal(mask[0, 0, 1], (feats[0, 1].flatten() >= 0))  # sigmoid(logit) < 0.5 is blocked
    assert mask[0, 0, 0].all()


def test_decoder_level_order_and_masks_follow_previous_prediction(model):
    """Layer i reads level i % 3 (coarsest first), with the mask the official rule makes from
    prediction i: its 1/4 mask logits bilinearly resized to the level, sigmoid < 0.5 blocked, fully
    blocked rows unblocked; the mask carries no gradient."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args)) for layer in
             model.transformer_decoder.layers]
    x = torch.rand(2, 3, 64, 96)
    out = model(x)
    for h in hooks:
        h.remove()
    level_sizes = [(2, 3), (4, 6), (8, 12)]
    predictions = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    for i, (tgt, memory, pos, qpos, mask) in enumerate(seen):
        size = level_sizes[i % 3]
        assert memory.shape[1] == size[0] * size[1], f"layer {i} attends the wrong level"
        assert not mask.requires_grad and mask.grad_fn is None
        logits = F.interpolate(predictions[i].detach(), size=size, mode="bilinear", align_corners=False).flatten(2)
        blocked = logits.sigmoid() < 0.5
        blocked[blocked.all(-1)] = False
        sure = logits.abs() > 1e-4  # rounding may flip a pixel whose logit is 0 to within float error
        assert torch.equal(mask[:, 0][sure], ~blocked[sure]), f"attention mask of layer {i}"


def test_gradients_reach_every_parameter():
    model = tiny_model(dec_layers=3).train()
    out = model(torch.rand(1, 3, 64, 64))
    surrogate = sum(o["pred_logits"].square().mean() + o["pred_masks"].sigmoid().mean()
                    for o in [out] + out["aux_outputs"])
    surrogate.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for name, part in model.named_children():
        grads = [p.grad.abs().sum() for p in part.parameters()]
        assert not grads or sum(grads) > 0, name


# ---------------------------------------------------------------------------------------- switches, predict
def test_fused_switch_reaches_every_op(model, monkeypatch):
    seen = []
    for name in ("ms_deform_attn", "mask_logits"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, backend="reference", _o=original, _n=name, **k:
                            seen.append((_n, backend)) or _o(*a, backend=backend, **k))
    m = tiny_model(dec_layers=1, fused=True)
    assert m.fused and m.matcher.fused and m.criterion.fused
    with torch.no_grad():
        m(torch.rand(1, 3, 64, 64))
    assert {b for _, b in seen} == {"auto"} and {n for n, _ in seen} == {"ms_deform_attn", "mask_logits"}


def test_predict_tasks_sizes_and_one_semantic_op_call(model, monkeypatch):
    calls = []
    original = ops.semantic_inference
    monkeypatch.setattr(ops, "semantic_inference", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    images = [torch.rand(3, 40, 50), torch.rand(3, 33, 20)]
    sem = model.predict(images, "semantic")
    assert calls == [2], "predict must run the semantic op once for the whole batch"
    assert sem[0]["sem_seg"].shape == (K, 40, 50) and sem[1]["sem_seg"].shape == (K, 33, 20)
    pan = model.predict(images, "panoptic")
    ins = model.predict(images, "instance")
    assert pan[1]["panoptic_seg"][0].shape == (33, 20)
    assert ins[0]["masks"].shape == (7, 40, 50) and ins[1]["masks"].shape == (7, 33, 20)
    # Padding to 64x64 with the mean colour, upsampling and cropping by hand.
    padded = model.pixel_mean.expand(1, 3, 64, 64).clone()
    padded[..., :40, :50] = images[0]
    with torch.no_grad():
        out = model(padded)
    masks = F.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)[0, :, :40, :50]
    expected = torch.einsum("qk,qhw->khw", out["pred_logits"][0].softmax(-1)[:, :-1], masks.sigmoid())
    assert_close(sem[0]["sem_seg"], expected, what="predicted semantic scores")


def test_from_pretrained_delegates_to_convert(monkeypatch):
    seen = {}
    fake = types.ModuleType("fastmaskformer.convert")
    fake.from_pretrained = lambda path, model_class, **kw: seen.update(path=path, cls=model_class, kw=kw) or "model"
    monkeypatch.setitem(sys.modules, "fastmaskformer.convert", fake)
    assert Mask2Former.from_pretrained("ckpt.pkl", num_classes=3) == "model"
    assert seen == {"path": "ckpt.pkl", "cls": Mask2Former, "kw": {"num_classes": 3}}
    MaskFormer.from_pretrained("other.pth")
    assert seen["cls"] is MaskFormer


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, match", [
    (dict(conv_dim=48), "conv_dim"),
    (dict(enc_layers=0), "enc_layers"),
    (dict(dec_layers=0), "dec_layers"),
    (dict(num_points=0), "num_points"),
    (dict(importance_sample_ratio=1.5), "importance_sample_ratio"),
    (dict(oversample_ratio=0.5), "oversample_ratio"),
    (dict(hidden_dim=62), "hidden_dim"),
    (dict(backbone="vgg16"), "backbone"),
])
def test_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**overrides)


def test_bad_images_raise_clear_errors(model):
    with pytest.raises(ValueError, match="size_divisibility=32, got 70x90"):
        model(torch.rand(1, 3, 70, 90))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="features: expected 3 maps"):
        model.transformer_decoder([torch.rand(1, 64, 2, 2)], torch.rand(1, 32, 8, 8), model.head.mask_embed)


def test_package_exports():
    assert fastmaskformer.Mask2Former is Mask2Former and "Mask2Former" in fastmaskformer.__all__
