"""Checkpoint conversion against an implementation nobody here wrote: transformers' MaskFormer.

Each backbone builds a small transformers MaskFormer with random weights (no download),
``save_pretrained``s it and converts it; both models then run on the same images in eval mode.
The same weights are also written under the official detectron2 names (a map written here from
the official repository's modules, independent of convert.py's tables) as a model-zoo style .pkl,
which must convert to the same outputs. Backbone-only weights are checked against torchvision.
"""
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (a test dependency: a missing package fails here, it does not skip)
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerSwinConfig, ResNetConfig
from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig

import fastmaskformer
from fastmaskformer.convert import UnmappedKeysError, from_pretrained, load_backbone_weights
from fastmaskformer.modeling import Backbone

PARITY_ATOL = 1e-4
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
STAGES = ["stage1", "stage2", "stage3", "stage4"]
# Swin: every stage's resolution a multiple of the 7x7 window (see test_swin_needs_window_multiple).
IMAGE_SIZE = {"resnet": (64, 96), "swin": (224, 224)}
NUM_CLASSES = 8  # the synthetic dataset's, so that the converted model evaluates on it


def _hf_model(backbone: str) -> MaskFormerForInstanceSegmentation:
    bb = (ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                       out_features=STAGES) if backbone == "resnet" else MaskFormerSwinConfig(out_features=STAGES))
    dec = MaskFormerDetrConfig(d_model=64, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=96,
                               num_queries=7, encoder_layers=0, dropout=0.0)
    cfg = MaskFormerConfig(backbone_config=bb, decoder_config=dec, num_labels=NUM_CLASSES, fpn_feature_size=64,
                           mask_feature_size=32)
    torch.manual_seed(0)
    model = MaskFormerForInstanceSegmentation(cfg).eval()
    with torch.no_grad():  # away from the initialization (BatchNorm identity, zero biases): every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _reference(kind, tmp_path_factory):
    model = _hf_model(kind)
    folder = tmp_path_factory.mktemp(f"hf_{kind}")
    model.save_pretrained(folder)
    torch.manual_seed(1)
    images = torch.rand(1, 3, *IMAGE_SIZE[kind])
    with torch.no_grad():
        out = model((images - MEAN) / STD, output_hidden_states=True)
        # Every layer's logits as the official MaskFormer defines them: the decoder's shared LayerNorm
        # on each layer's output, then the heads. (transformers' own auxiliary_logits skip that norm
        # and start from the zero input queries, so they are not comparable layer by layer.)
        norm = model.model.transformer_module.decoder.layernorm
        pixel = out.pixel_decoder_last_hidden_state
        states = out.transformer_decoder_hidden_states  # (input, layer 1, ..., normalized layer L)
        layers = [norm(h) for h in states[1:-1]] + [states[-1]]
        expected = [(model.class_predictor(h), torch.einsum("bqc,bchw->bqhw", model.mask_embedder(h), pixel))
                    for h in layers]
    torch.testing.assert_close(expected[-1][0], out.class_queries_logits)
    torch.testing.assert_close(expected[-1][1], out.masks_queries_logits)
    hf = dict(kind=kind, model=model, folder=folder, images=images, expected=expected)
    hf["pkl"] = _d2_pkl(hf, folder)
    return hf


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """kind -> the transformers model, its folder, an official-name .pkl of it, images and outputs
    (built once per module and kind)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _reference(kind, tmp_path_factory)
        return cache[kind]
    return get


def assert_same_outputs(model, hf, what):
    """Class and mask logits of every prediction of ``model`` (eval mode) against transformers'."""
    model.eval()
    with torch.no_grad():
        out = model(hf["images"])
    layers = [*out["aux_outputs"], out]
    assert len(layers) == len(hf["expected"])
    for i, (ours, (logits, masks)) in enumerate(zip(layers, hf["expected"])):
        for name, a, b in (("class logits", ours["pred_logits"], logits), ("mask logits", ours["pred_masks"], masks)):
            assert a.shape == b.shape, f"{what} {hf['kind']} prediction {i} {name}: {a.shape} vs {b.shape}"
            diff = (a - b).abs().max().item()
            print(f"{what} {hf['kind']} prediction {i} {name}: max abs diff {diff:.2e}")
            assert diff <= PARITY_ATOL, f"{what} {hf['kind']} prediction {i} {name}: max abs diff {diff}"


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_hf_folder_parity(reference, kind):
    hf = reference(kind)
    model = fastmaskformer.MaskFormer.from_pretrained(str(hf["folder"]))
    assert model.num_classes == NUM_CLASSES and model.backbone.name == (
        "resnet18" if hf["kind"] == "resnet" else "swin_tiny_patch4_window7_224")
    assert_same_outputs(model, hf, "transformers folder")


# -- the official detectron2 names, written from facebookresearch/MaskFormer's modules ------------
_PLM = r"model\.pixel_level_module\."
_DEC = r"model\.transformer_module\.decoder\.layers\.(\d)\."
_OFF_DEC = "sem_seg_head.predictor.transformer.decoder.layers.{}."
_SWIN_BLOCK = {"layernorm_before": "norm1", "attention.self.relative_position_bias_table":
               "attn.relative_position_bias_table", "attention.self.relative_position_index":
               "attn.relative_position_index", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
# transformers name -> official name: detectron2 ResNet (FrozenBN as conv.norm) or D2SwinTransformer,
# BasePixelDecoder (layer_4 on res5, adapter_k/layer_k on res_{k+1}), TransformerPredictor.
_TO_OFFICIAL = [
    (_PLM + r"encoder\.embedder\.embedder\.convolution\.weight", lambda g: "backbone.stem.conv1.weight"),
    (_PLM + r"encoder\.embedder\.embedder\.normalization\.(\w+)", lambda g: f"backbone.stem.conv1.norm.{g[0]}"),
    (_PLM + r"encoder\.encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.convolution\.weight",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.conv{int(g[2]) + 1}.weight"),
    (_PLM + r"encoder\.encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.normalization\.(\w+)",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.conv{int(g[2]) + 1}.norm.{g[3]}"),
    (_PLM + r"encoder\.encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.convolution\.weight",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.shortcut.weight"),
    (_PLM + r"encoder\.encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.normalization\.(\w+)",
     lambda g: f"backbone.res{int(g[0]) + 2}.{g[1]}.shortcut.norm.{g[2]}"),
    (_PLM + r"encoder\.model\.embeddings\.patch_embeddings\.projection\.(\w+)",
     lambda g: f"backbone.patch_embed.proj.{g[0]}"),
    (_PLM + r"encoder\.model\.embeddings\.norm\.(\w+)", lambda g: f"backbone.patch_embed.norm.{g[0]}"),
    (_PLM + r"encoder\.model\.encoder\.layers\.(\d)\.blocks\.(\d)\.(attention\.self\.relative_position_\w+)",
     lambda g: f"backbone.layers.{g[0]}.blocks.{g[1]}.{_SWIN_BLOCK[g[2]]}"),
    (_PLM + r"encoder\.model\.encoder\.layers\.(\d)\.blocks\.(\d)\.(.*)\.(\w+)",
     lambda g: f"backbone.layers.{g[0]}.blocks.{g[1]}.{_SWIN_BLOCK[g[2]]}.{g[3]}"),
    (_PLM + r"encoder\.model\.encoder\.layers\.(\d)\.downsample\.(.*)",
     lambda g: f"backbone.layers.{g[0]}.downsample.{g[1]}"),
    (_PLM + r"encoder\.hidden_states_norms\.(\d)\.(\w+)", lambda g: f"backbone.norm{g[0]}.{g[1]}"),
    (_PLM + r"decoder\.fpn\.stem\.0\.weight", lambda g: "sem_seg_head.pixel_decoder.layer_4.weight"),
    (_PLM + r"decoder\.fpn\.stem\.1\.(\w+)", lambda g: f"sem_seg_head.pixel_decoder.layer_4.norm.{g[0]}"),
    (_PLM + r"decoder\.fpn\.layers\.(\d)\.proj\.0\.weight",
     lambda g: f"sem_seg_head.pixel_decoder.adapter_{3 - int(g[0])}.weight"),
    (_PLM + r"decoder\.fpn\.layers\.(\d)\.proj\.1\.(\w+)",
     lambda g: f"sem_seg_head.pixel_decoder.adapter_{3 - int(g[0])}.norm.{g[1]}"),
    (_PLM + r"decoder\.fpn\.layers\.(\d)\.block\.0\.weight",
     lambda g: f"sem_seg_head.pixel_decoder.layer_{3 - int(g[0])}.weight"),
    (_PLM + r"decoder\.fpn\.layers\.(\d)\.block\.1\.(\w+)",
     lambda g: f"sem_seg_head.pixel_decoder.layer_{3 - int(g[0])}.norm.{g[1]}"),
    (_PLM + r"decoder\.mask_projection\.(\w+)", lambda g: f"sem_seg_head.pixel_decoder.mask_features.{g[0]}"),
    (r"model\.transformer_module\.queries_embedder\.weight", lambda g: "sem_seg_head.predictor.query_embed.weight"),
    (r"model\.transformer_module\.input_projection\.(\w+)", lambda g: f"sem_seg_head.predictor.input_proj.{g[0]}"),
    (_DEC + r"self_attn\.o_proj\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"self_attn.out_proj.{g[1]}"),
    (_DEC + r"encoder_attn\.o_proj\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"multihead_attn.out_proj.{g[1]}"),
    (_DEC + r"self_attn_layer_norm\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"norm1.{g[1]}"),
    (_DEC + r"encoder_attn_layer_norm\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"norm2.{g[1]}"),
    (_DEC + r"final_layer_norm\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"norm3.{g[1]}"),
    (_DEC + r"mlp\.fc(\d)\.(\w+)", lambda g: _OFF_DEC.format(g[0]) + f"linear{g[1]}.{g[2]}"),
    (r"model\.transformer_module\.decoder\.layernorm\.(\w+)",
     lambda g: f"sem_seg_head.predictor.transformer.decoder.norm.{g[0]}"),
    (r"class_predictor\.(\w+)", lambda g: f"sem_seg_head.predictor.class_embed.{g[0]}"),
    (r"mask_embedder\.(\d)\.0\.(\w+)", lambda g: f"sem_seg_head.predictor.mask_embed.layers.{g[0]}.{g[1]}"),
    (r"criterion\.empty_weight", lambda g: "criterion.empty_weight"),
]
# q, k, v kept apart by transformers, fused in the official modules (MultiheadAttention.in_proj, Swin qkv)
_TO_OFFICIAL_FUSED = [
    (_DEC + r"self_attn\.([qkv])_proj\.(\w+)", lambda g: (_OFF_DEC.format(g[0]) + f"self_attn.in_proj_{g[2]}", g[1])),
    (_DEC + r"encoder_attn\.([qkv])_proj\.(\w+)",
     lambda g: (_OFF_DEC.format(g[0]) + f"multihead_attn.in_proj_{g[2]}", g[1])),
    (_PLM + r"encoder\.model\.encoder\.layers\.(\d)\.blocks\.(\d)\.attention\.self\.(query|key|value)\.(\w+)",
     lambda g: (f"backbone.layers.{g[0]}.blocks.{g[1]}.attn.qkv.{g[3]}", g[2][0])),
]
# detectron2's FrozenBatchNorm has no counter; D2SwinTransformer has no classifier norm.
_NOT_OFFICIAL = (r".*num_batches_tracked", _PLM + r"encoder\.model\.layernorm\..*")


def official_from_hf(hf_state, to_official=None, to_official_fused=None, not_official=None):
    """A transformers state dict under the official detectron2 names (NumPy arrays, as a zoo .pkl
    holds them), by the test's own rename rules (MaskFormer's by default): separate q/k/v joined."""
    to_official = _TO_OFFICIAL if to_official is None else to_official
    to_official_fused = _TO_OFFICIAL_FUSED if to_official_fused is None else to_official_fused
    not_official = _NOT_OFFICIAL if not_official is None else not_official
    out, parts = {}, {}
    for key, value in hf_state.items():
        if any(re.fullmatch(p, key) for p in not_official):
            continue
        for pattern, name in to_official_fused:
            m = re.fullmatch(pattern, key)
            if m:
                target, part = name(m.groups())
                parts.setdefault(target, {})[part] = value
                break
        else:
            for pattern, name in to_official:
                m = re.fullmatch(pattern, key)
                if m:
                    out[name(m.groups())] = value
                    break
            else:
                raise AssertionError(f"the test's official-name map misses {key}")
    out.update({k: torch.cat([v["q"], v["k"], v["v"]]) for k, v in parts.items()})
    return {k: v.numpy() for k, v in out.items()}


def _d2_pkl(hf, folder):
    path = folder / f"model_final_{hf['kind']}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": official_from_hf(hf["model"].state_dict()), "__author__": "test"}, f)
    return path


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_detectron2_pkl_parity(reference, kind):
    hf = reference(kind)
    model = from_pretrained(str(hf["pkl"]), nheads=4)  # the head count is not in the weights
    assert model.transformer_decoder.decoder.layers[0].self_attn.num_heads == 4
    assert_same_outputs(model, hf, "detectron2 pkl")


def test_unmapped_keys_are_named(reference, tmp_path):
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


def test_pkl_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": subprocess.Popen}}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle subprocess.Popen"):
        from_pretrained(str(path))


def test_cli_convert_then_evaluate(reference, tmp_path, capsys):
    """``python -m fastmaskformer.convert`` writes a checkpoint and a config that
    ``python -m fastmaskformer.evaluate`` takes, on the synthetic dataset (NUM_CLASSES classes).
    Both entry points run in this process (their ``main(argv)``), to keep the test fast."""
    from fastmaskformer import convert, evaluate
    hf = reference("resnet")
    out = tmp_path / "converted.pth"
    yaml_path = convert.main([str(hf["folder"]), str(out)])
    assert yaml_path == str(tmp_path / "converted.yaml")
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["model"]["backbone"] == "resnet18" and ckpt["config"]["data"]["num_classes"] == NUM_CLASSES
    assert_same_outputs(from_pretrained(str(out)), hf, "converted .pth")
    metrics = evaluate.main(["--config", yaml_path, "--checkpoint", str(out), "--output", str(tmp_path / "m.json"),
                             "data.val_length=2", "data.image_size=64", "data.test_size=0", "train.device=cpu"])
    assert 0 <= metrics["mIoU"] <= 100 and (tmp_path / "m.json").exists()


# -- backbone-only weights -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_r18():
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats, y = [], net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            feats.append(y)
    return net.state_dict(), x, feats


def _to_d2(state):
    """MaskFormer's tools/convert-torchvision-to-d2.py, as the official script writes R-50.pkl."""
    out = {}
    for k, v in state.items():
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v.numpy()
    return {"model": out, "__author__": "torchvision", "matching_heuristics": True}


@pytest.mark.parametrize("layout", ["torchvision", "detectron2", "fastmaskformer"])
def test_backbone_only_weights(layout, torchvision_r18, tmp_path):
    state, x, expected = torchvision_r18
    if layout == "torchvision":
        path = tmp_path / "r18.pth"
        torch.save(state, path)
    elif layout == "detectron2":
        path = tmp_path / "R-18.pkl"
        with open(path, "wb") as f:
            pickle.dump(_to_d2(state), f)
    else:  # a converted or trained fastmaskformer checkpoint: its backbone only
        src = tmp_path / "r18.pth"
        torch.save(state, src)
        model = fastmaskformer.MaskFormer(3, backbone="resnet18", hidden_dim=64, conv_dim=64, mask_dim=64,
                                          dim_feedforward=64, dec_layers=1, pretrained=str(src))
        path = tmp_path / "model.pth"
        torch.save({"model": model.state_dict()}, path)
    backbone = Backbone("resnet18", pretrained=str(path)).eval()
    with torch.no_grad():
        feats = backbone(x * 1.0)
    for (name, f), e in zip(feats.items(), expected):
        torch.testing.assert_close(f, e, msg=lambda m: f"{layout} {name}: {m}")


def test_backbone_caffe2_resnet_is_refused(tmp_path):
    path = tmp_path / "R-50-msra.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                               "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}}, f)
    with pytest.raises(ValueError, match="Caffe2-format MSRA ResNet"):
        Backbone("resnet18", pretrained=str(path))


def test_backbone_shape_mismatch_is_named(torchvision_r18, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision_r18[0], path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: expected shape \(64, 64, 1, 1\), got \(64, 64, 3"):
        Backbone("resnet50", pretrained=str(path))
