"""Mask2Former checkpoint conversion against an implementation nobody here wrote: transformers'
Mask2FormerForUniversalSegmentation.

Each backbone builds a small transformers Mask2Former with random weights (no download),
``save_pretrained``s it and converts it; both models then run on the same images in eval mode and
every prediction (the initial queries' and each decoder layer's) must agree. The same weights are
also written under the official detectron2 names as a model-zoo style .pkl, by a map written here
from facebookresearch/Mask2Former's modules (MSDeformAttnPixelDecoder,
MultiScaleMaskedTransformerDecoder, D2SwinTransformer, detectron2's ResNet), independent of
convert.py's tables.
"""
import json
import pickle
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

from fastmaskformer import Mask2Former, MaskFormer
from fastmaskformer.convert import UnmappedKeysError, from_pretrained

from test_convert import assert_same_outputs, official_from_hf

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
STAGES = ["stage1", "stage2", "stage3", "stage4"]
# transformers' SwinBackbone keeps the shifted windows at every size (always_partition), as the
# official Swin does; stage sizes that are multiples of the 7x7 window (see test_convert.py).
IMAGES = {"resnet": (2, 64, 96), "swin": (1, 224, 224)}
NUM_CLASSES = 8  # the synthetic dataset's, so that a converted model evaluates on it
# feature_size (conv_dim) != hidden_dim: the decoder's input projections are converted too.
TINY = dict(num_labels=NUM_CLASSES, feature_size=32, mask_feature_size=32, hidden_dim=64, encoder_feedforward_dim=96,
            encoder_layers=2, decoder_layers=5, num_attention_heads=4, dim_feedforward=96, num_queries=7)


def _backbone_config(kind):
    if kind == "resnet":
        return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", out_features=STAGES)
    return SwinConfig(out_features=STAGES)


def _hf_model(kind, **config):
    cfg = Mask2FormerConfig(backbone_config=_backbone_config(kind), **{**TINY, **config})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Backbone resnet is not a supported model" (it is, through load_backbone)
        model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():  # away from the initialization (BatchNorm identity, zero biases): every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _predictions(model, images):
    """transformers' class and mask logits of every prediction, initial queries first."""
    with torch.no_grad():
        out = model((images - MEAN) / STD, output_auxiliary_logits=True)
    return [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits] + \
        [(out.class_queries_logits, out.masks_queries_logits)]


def _reference(kind, tmp_path_factory):
    model = _hf_model(kind)
    folder = tmp_path_factory.mktemp(f"hf_m2f_{kind}")
    model.save_pretrained(folder)
    torch.manual_seed(1)
    B, H, W = IMAGES[kind]
    images = torch.rand(B, 3, H, W)
    expected = _predictions(model, images)
    assert len(expected) == TINY["decoder_layers"]  # transformers counts the initial prediction as a layer
    # The masks that the next layer's attention is restricted by block some pixels and allow others:
    # the masked-attention rule is exercised, not bypassed by all-open or all-blocked rows.
    for _, masks in expected[:-1]:
        assert 0.05 < (masks > 0).float().mean().item() < 0.95
    hf = dict(kind=kind, model=model, folder=folder, images=images, expected=expected)
    hf["pkl"] = folder / f"model_final_{kind}.pkl"
    with open(hf["pkl"], "wb") as f:
        # from the saved file: transformers 5 renames some modules in memory (e.g. Swin's q_proj), not on disk
        pickle.dump({"model": _official_from_hf(load_file(folder / "model.safetensors")), "__author__": "test"}, f)
    return hf


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """kind -> the transformers model, its folder, an official-name .pkl of it, images and outputs."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _reference(kind, tmp_path_factory)
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_hf_folder_parity(reference, kind):
    hf = reference(kind)
    model = Mask2Former.from_pretrained(str(hf["folder"]))
    assert type(model) is Mask2Former and model.num_classes == NUM_CLASSES
    assert model.backbone.name == ("resnet18" if kind == "resnet" else "swin_tiny_patch4_window7_224")
    assert len(model.transformer_decoder.layers) == TINY["decoder_layers"] - 1
    assert len(model.pixel_decoder.encoder) == TINY["encoder_layers"]
    assert model.pixel_decoder.encoder[0].self_attn.n_points == 4
    # the loss settings come from the config too (transformers' defaults: 2 / 5 / 5, eos 0.1, 12544 points)
    assert (model.matcher.cost_class, model.matcher.cost_mask, model.matcher.cost_dice) == (2.0, 5.0, 5.0)
    assert model.criterion.eos_coef == 0.1 and model.num_points == 12544
    assert_same_outputs(model, hf, "transformers folder")


def test_generic_from_pretrained_picks_the_class(reference):
    hf = reference("resnet")
    assert type(from_pretrained(str(hf["folder"]))) is Mask2Former
    with pytest.raises(ValueError, match=r"model_class: .* holds a Mask2Former checkpoint.*got 'MaskFormer'"):
        MaskFormer.from_pretrained(str(hf["folder"]))


# -- the official detectron2 names, written from facebookresearch/Mask2Former's modules ----------
_BB = r"model\.pixel_level_module\.encoder\."
_PD = r"model\.pixel_level_module\.decoder\."
_TM = r"model\.transformer_module\."
_OFF_PD = "sem_seg_head.pixel_decoder."
_OFF = "sem_seg_head.predictor."
_SWIN_BLOCK = {"layernorm_before": "norm1", "attention.self.relative_position_bias_table":
               "attn.relative_position_bias_table", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_ENC_PART = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
# transformers decoder layer part -> (official ModuleList, its sub-module)
_DEC_PART = {"cross_attn_layer_norm": ("transformer_cross_attention_layers", "norm"),
             "self_attn_layer_norm": ("transformer_self_attention_layers", "norm"),
             "self_attn.out_proj": ("transformer_self_attention_layers", "self_attn.out_proj"),
             "fc1": ("transformer_ffn_layers", "linear1"), "fc2": ("transformer_ffn_layers", "linear2"),
             "final_layer_norm": ("transformer_ffn_layers", "norm")}
_TO_OFFICIAL = [
    # detectron2 ResNet (FrozenBN as conv.norm) and D2SwinTransformer
    (_BB + r"embedder\.embedder\.convolution\.weight", lambda g: "backbone.stem.conv1.weight"),
    (_BB + r"embedder\.embedder\.normalization\.(\w+)", lambda g: f"backbone.stem.conv1.norm.{g[0]}"),
    (_BB + r"encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.convolution\.weight",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.conv{int(g[2]) + 1}.weight"),
    (_BB + r"encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.normalization\.(\w+)",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.conv{int(g[2]) + 1}.norm.{g[3]}"),
    (_BB + r"encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.convolution\.weight",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.shortcut.weight"),
    (_BB + r"encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.normalization\.(\w+)",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.shortcut.norm.{g[2]}"),
    (_BB + r"embeddings\.patch_embeddings\.projection\.(\w+)", lambda g: f"backbone.patch_embed.proj.{g[0]}"),
    (_BB + r"embeddings\.norm\.(\w+)", lambda g: f"backbone.patch_embed.norm.{g[0]}"),
    (_BB + r"encoder\.layers\.(\d)\.blocks\.(\d)\.(attention\.self\.relative_position_bias_table)",
     lambda g: f"backbone.layers.{g[0]}.blocks.{g[1]}.{_SWIN_BLOCK[g[2]]}"),
    (_BB + r"encoder\.layers\.(\d)\.blocks\.(\d)\.(.*)\.(\w+)",
     lambda g: f"backbone.layers.{g[0]}.blocks.{g[1]}.{_SWIN_BLOCK[g[2]]}.{g[3]}"),
    (_BB + r"encoder\.layers\.(\d)\.downsample\.(.*)", lambda g: f"backbone.layers.{g[0]}.downsample.{g[1]}"),
    (_BB + r"hidden_states_norms\.stage(\d)\.(\w+)", lambda g: f"backbone.norm{int(g[0]) - 1}.{g[1]}"),
    # MSDeformAttnPixelDecoder
    (_PD + r"level_embed", lambda g: _OFF_PD + "transformer.level_embed"),
    (_PD + r"input_projections\.(\d)\.(\d)\.(\w+)", lambda g: _OFF_PD + f"input_proj.{g[0]}.{g[1]}.{g[2]}"),
    (_PD + r"encoder\.layers\.(\d)\.self_attn\.(\w+)\.(\w+)",
     lambda g: _OFF_PD + f"transformer.encoder.layers.{g[0]}.self_attn.{g[1]}.{g[2]}"),
    (_PD + r"encoder\.layers\.(\d)\.(\w+)\.(\w+)",
     lambda g: _OFF_PD + f"transformer.encoder.layers.{g[0]}.{_ENC_PART[g[1]]}.{g[2]}"),
    (_PD + r"mask_projection\.(\w+)", lambda g: _OFF_PD + f"mask_features.{g[0]}"),
    (_PD + r"(adapter_1|layer_1)\.0\.weight", lambda g: _OFF_PD + f"{g[0]}.weight"),
    (_PD + r"(adapter_1|layer_1)\.1\.(\w+)", lambda g: _OFF_PD + f"{g[0]}.norm.{g[1]}"),
    # MultiScaleMaskedTransformerDecoder
    (_TM + r"queries_features\.weight", lambda g: _OFF + "query_feat.weight"),
    (_TM + r"queries_embedder\.weight", lambda g: _OFF + "query_embed.weight"),
    (_TM + r"level_embed\.weight", lambda g: _OFF + "level_embed.weight"),
    (_TM + r"input_projections\.(\d)\.(\w+)", lambda g: _OFF + f"input_proj.{g[0]}.{g[1]}"),
    (_TM + r"decoder\.layers\.(\d)\.cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     lambda g: _OFF + f"transformer_cross_attention_layers.{g[0]}.multihead_attn.{g[1]}"),
    (_TM + r"decoder\.layers\.(\d)\.(.*)\.(weight|bias)",
     lambda g: _OFF + "{}.{}.{}.{}".format(_DEC_PART[g[1]][0], g[0], _DEC_PART[g[1]][1], g[2])),
    (_TM + r"decoder\.layernorm\.(\w+)", lambda g: _OFF + f"decoder_norm.{g[0]}"),
    (_TM + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)",
     lambda g: _OFF + f"mask_embed.layers.{g[0]}.{g[1]}"),
    (r"class_predictor\.(\w+)", lambda g: _OFF + f"class_embed.{g[0]}"),
    (r"criterion\.empty_weight", lambda g: "criterion.empty_weight"),
]
# q, k, v kept apart by transformers, fused in the official modules (MultiheadAttention.in_proj, Swin qkv)
_TO_OFFICIAL_FUSED = [
    (_TM + r"decoder\.layers\.(\d)\.self_attn\.([qkv])_proj\.(\w+)",
     lambda g: (_OFF + f"transformer_self_attention_layers.{g[0]}.self_attn.in_proj_{g[2]}", g[1])),
    (_BB + r"encoder\.layers\.(\d)\.blocks\.(\d)\.attention\.self\.(query|key|value)\.(\w+)",
     lambda g: (f"backbone.layers.{g[0]}.blocks.{g[1]}.attn.qkv.{g[3]}", g[2][0])),
]
# detectron2's FrozenBatchNorm has no counter; D2SwinTransformer has no classifier norm.
_NOT_OFFICIAL = (r".*num_batches_tracked", _BB + r"(?:swin\.)?layernorm\..*")


def _official_from_hf(hf_state):
    return official_from_hf(hf_state, _TO_OFFICIAL, _TO_OFFICIAL_FUSED, _NOT_OFFICIAL)


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_detectron2_pkl_parity(reference, kind):
    hf = reference(kind)
    model = from_pretrained(str(hf["pkl"]), nheads=4)  # the head counts are not in the weights
    assert type(model) is Mask2Former
    enc = model.pixel_decoder.encoder[0].self_attn
    assert (enc.n_heads, enc.n_points) == (4, 4)  # the encoder follows nheads; points follow from the shapes
    assert model.transformer_decoder.layers[0].self_attn.num_heads == 4
    assert model.pixel_decoder.encoder[0].ffn.linear1.out_features == TINY["encoder_feedforward_dim"]
    assert_same_outputs(model, hf, "detectron2 pkl")


def test_pkl_unmapped_keys_and_head_count_errors(reference, tmp_path):
    hf = reference("resnet")
    with open(hf["pkl"], "rb") as f:
        obj = pickle.load(f)
    obj["model"]["sem_seg_head.predictor.extra_thing.weight"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(UnmappedKeysError, match=r"sem_seg_head\.predictor\.extra_thing\.weight.*allow_unmapped"):
        from_pretrained(str(bad), nheads=4)
    assert_same_outputs(from_pretrained(str(bad), nheads=4, allow_unmapped=True), hf, "allow_unmapped")
    # 48 attention-weight rows = heads * 3 levels * points: 5 heads cannot be right
    with pytest.raises(ValueError, match=r"enc_nheads: the encoder's attention weights have 48 rows"):
        from_pretrained(str(hf["pkl"]), nheads=4, enc_nheads=5)


@pytest.mark.parametrize("field, value, message", [
    ("pre_norm", True, r"pre_norm: fastmaskformer's Mask2Former supports False only"),
    ("common_stride", 8, r"common_stride: .* supports 4 only"),
    ("enforce_input_projection", True, None),  # feature_size != hidden_dim here: a projection anyway, accepted
    ("model_type", "oneformer", r"model_type: expected 'maskformer' .* or 'mask2former'"),
])
def test_hf_config_checks(reference, tmp_path, field, value, message):
    hf = reference("resnet")
    folder = tmp_path / "hf"
    shutil.copytree(hf["folder"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    if message is None:
        assert_same_outputs(Mask2Former.from_pretrained(str(folder)), hf, field)
    else:
        with pytest.raises(ValueError, match=message):
            Mask2Former.from_pretrained(str(folder))


def test_convert_keeps_what_the_config_cannot_hold(reference, tmp_path):
    """An image mean/std from preprocessor_config.json that differs from the defaults has no field in
    the trainer's ModelConfig: convert warns, keeps it in the checkpoint, and from_pretrained(OUT.pth)
    restores it; the architecture and Mask2Former's own loss weights are in the config."""
    from fastmaskformer import convert
    hf = reference("resnet")
    folder = tmp_path / "hf"
    shutil.copytree(hf["folder"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                 "image_std": [0.2, 0.25, 0.3]}))
    out = tmp_path / "m2f.pth"
    with pytest.warns(UserWarning, match=r"no fields for .*'pixel_mean': \(0\.5, 0\.4, 0\.3\)"):
        convert.convert(str(folder), str(out))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["model"]["meta_architecture"] == "mask2former"
    assert ckpt["config"]["model"]["class_weight"] == 2.0 and ckpt["config"]["model"]["dec_layers"] == 4
    model = from_pretrained(str(out))
    assert model.pixel_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert model.pixel_std.flatten().tolist() == pytest.approx([0.2, 0.25, 0.3])
    model.pixel_mean.copy_(MEAN.view(3, 1, 1))  # the reference outputs were computed with the default mean/std
    model.pixel_std.copy_(STD.view(3, 1, 1))
    assert_same_outputs(model, hf, "converted .pth")


def test_cli_convert_then_evaluate(tmp_path):
    """``python -m fastmaskformer.convert`` then ``python -m fastmaskformer.evaluate`` on a tiny random
    transformers Mask2Former whose encoder has the default heads and FFN (so the .yaml describes it
    fully), on the synthetic dataset. Both entry points run in this process (their ``main(argv)``)."""
    from fastmaskformer import convert, evaluate
    model = _hf_model("resnet", feature_size=64, num_attention_heads=8, encoder_feedforward_dim=1024,
                      decoder_layers=3, encoder_layers=1)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    out = tmp_path / "converted.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing the config cannot hold
        yaml_path = convert.main([str(folder), str(out)])
    assert yaml_path == str(tmp_path / "converted.yaml")
    images = torch.rand(1, 3, 64, 64)
    expected = _predictions(model, images)
    hf = dict(kind="resnet (defaults)", images=images, expected=expected)
    assert_same_outputs(from_pretrained(str(out)), hf, "converted .pth")
    metrics = evaluate.main(["--config", yaml_path, "--checkpoint", str(out), "--output", str(tmp_path / "m.json"),
                             "data.val_length=2", "data.image_size=64", "data.test_size=0", "train.device=cpu"])
    assert 0 <= metrics["mIoU"] <= 100 and (tmp_path / "m.json").exists()
