"""Checkpoints in: MaskFormer and Mask2Former weights from Hugging Face and detectron2, and
backbone-only weights.

    python -m fastmaskformer.convert SRC OUT.pth [--allow-unmapped] [field=value ...]

SRC is a Hugging Face ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``; ResNet or Swin backbone) of ``MaskFormerForInstanceSegmentation`` or
``Mask2FormerForUniversalSegmentation``, or an official detectron2 model-zoo ``.pkl`` of MaskFormer
or Mask2Former (a pickled dict whose "model" maps the official names to NumPy arrays). The model
class and configuration (classes, queries, layers, backbone, pixel decoder) are read from the
source: ``config.json``, or the shapes of the official weights, whose unreadable fields, the head
counts (``nheads``; Mask2Former's deformable encoder ``enc_nheads``, which follows ``nheads``),
default to the official 8. OUT.pth holds ``{"model": state_dict, "config": ...}`` as the trainer
writes it, and OUT.yaml next to it holds the same config for
``python -m fastmaskformer.evaluate --config OUT.yaml --checkpoint OUT.pth``.

Every source is translated by one table of ``(source regex, target template)`` rules. A template
names the regex's groups as ``{name}`` (``{name+1}`` offsets an index); a source key matching a
rule whose regex has a ``qkv`` group is one third of a fused q/k/v projection, joined in q, k, v
order (transformers keeps q, k and v apart; ``nn.MultiheadAttention`` and timm's Swin fuse them).
Keys that no rule maps raise an error naming them unless ``allow_unmapped``; keys a table lists as
ignored (buffers recomputed here, classifier heads) are dropped silently.

``load_backbone_weights`` is the loader behind ``model.pretrained=...``: timm and torchvision ResNet
state dicts, detectron2's torchvision-converted ``R-50.pkl``, timm or official Swin weights, and the
backbone of a fastmaskformer checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pickle
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Rules = Sequence[Tuple[str, str]]
State = Dict[str, torch.Tensor]

# -- the tables ----------------------------------------------------------------------------------
# Targets are keys of fastmaskformer.MaskFormer's state dict; backbone targets are under
# "backbone.body." (the timm feature extractor) or "backbone.norms." (the Swin output norms).

_P = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"

HF_RESNET: Rules = (  # transformers ResNetBackbone -> timm ResNet
    (r"embedder\.embedder\.convolution\.weight", "backbone.body.conv1.weight"),
    (rf"embedder\.embedder\.normalization\.{_P}", "backbone.body.bn1.{p}"),
    (r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.shortcut\.convolution\.weight",
     "backbone.body.layer{s+1}.{b}.downsample.0.weight"),
    (rf"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.shortcut\.normalization\.{_P}",
     "backbone.body.layer{s+1}.{b}.downsample.1.{p}"),
    (r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.layer\.(?P<c>\d)\.convolution\.weight",
     "backbone.body.layer{s+1}.{b}.conv{c+1}.weight"),
    (rf"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.layer\.(?P<c>\d)\.normalization\.{_P}",
     "backbone.body.layer{s+1}.{b}.bn{c+1}.{p}"),
)
# transformers' Swin, either as MaskFormer's MaskFormerSwinBackbone (under "model.") or as the
# SwinBackbone of Mask2Former ("swin." in transformers 5's in-memory names, nothing in saved files).
_HF_SW = r"(?:model\.|swin\.)?"
_HF_BLOCK = _HF_SW + r"encoder\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\."
_BODY_BLOCK = "backbone.body.layers_{i}.blocks.{j}."
HF_SWIN: Rules = (  # transformers' Swin -> timm Swin (+ the output norms)
    (_HF_SW + r"embeddings\.patch_embeddings\.projection\.(?P<p>weight|bias)", "backbone.body.patch_embed.proj.{p}"),
    (_HF_SW + r"embeddings\.norm\.(?P<p>weight|bias)", "backbone.body.patch_embed.norm.{p}"),
    (_HF_BLOCK + r"layernorm_before\.(?P<p>weight|bias)", _BODY_BLOCK + "norm1.{p}"),
    (_HF_BLOCK + r"attention\.(?:self\.|relative_position_bias\.)relative_position_bias_table",
     _BODY_BLOCK + "attn.relative_position_bias_table"),
    (_HF_BLOCK + r"attention\.self\.(?P<qkv>query|key|value)\.(?P<p>weight|bias)", _BODY_BLOCK + "attn.qkv.{p}"),
    (_HF_BLOCK + r"attention\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)", _BODY_BLOCK + "attn.qkv.{p}"),
    (_HF_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(?P<p>weight|bias)", _BODY_BLOCK + "attn.proj.{p}"),
    (_HF_BLOCK + r"layernorm_after\.(?P<p>weight|bias)", _BODY_BLOCK + "norm2.{p}"),
    (_HF_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(?P<p>weight|bias)", _BODY_BLOCK + "mlp.fc1.{p}"),
    (_HF_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(?P<p>weight|bias)", _BODY_BLOCK + "mlp.fc2.{p}"),
    # Patch merging ends stage i in transformers (and the official Swin), starts stage i+1 in timm.
    (_HF_SW + r"encoder\.layers\.(?P<i>\d+)\.downsample\.(?P<rest>reduction\.weight|norm\.weight|norm\.bias)",
     "backbone.body.layers_{i+1}.downsample.{rest}"),
    (r"hidden_states_norms\.(?P<i>\d+)\.(?P<p>weight|bias)", "backbone.norms.{i}.{p}"),  # MaskFormerSwin: 0..3
    (r"hidden_states_norms\.stage(?P<i>\d+)\.(?P<p>weight|bias)", "backbone.norms.{i-1}.{p}"),  # Swin: stage1..4
)
HF_SWIN_IGNORED = (r".*relative_position_index", _HF_SW + r"layernorm\..*")  # a buffer; the unused final norm

_HF_DEC = r"model\.transformer_module\.decoder\.layers\.(?P<i>\d+)\."
_DEC = "transformer_decoder.decoder.layers.{i}."
HF_MASKFORMER: Rules = (  # everything after the backbone; old (4.x) and new (5.x) transformers names
    (r"model\.pixel_level_module\.decoder\.fpn\.stem\.0\.weight", "pixel_decoder.top_conv.0.weight"),
    (r"model\.pixel_level_module\.decoder\.fpn\.stem\.1\.(?P<p>weight|bias)", "pixel_decoder.top_conv.1.{p}"),
    (r"model\.pixel_level_module\.decoder\.fpn\.layers\.(?P<i>\d+)\.proj\.(?P<m>[01])\.(?P<p>weight|bias)",
     "pixel_decoder.lateral_convs.{i}.{m}.{p}"),
    (r"model\.pixel_level_module\.decoder\.fpn\.layers\.(?P<i>\d+)\.block\.(?P<m>[01])\.(?P<p>weight|bias)",
     "pixel_decoder.output_convs.{i}.{m}.{p}"),
    (r"model\.pixel_level_module\.decoder\.mask_projection\.(?P<p>weight|bias)", "pixel_decoder.mask_features.{p}"),
    (r"model\.transformer_module\.queries_embedder\.weight", "transformer_decoder.query_embed.weight"),
    (r"model\.transformer_module\.input_projection\.(?P<p>weight|bias)", "transformer_decoder.input_proj.{p}"),
    (_HF_DEC + r"self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)", _DEC + "self_attn.in_proj_{p}"),
    (_HF_DEC + r"self_attn\.(?:o|out)_proj\.(?P<p>weight|bias)", _DEC + "self_attn.out_proj.{p}"),
    (_HF_DEC + r"encoder_attn\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)", _DEC + "cross_attn.in_proj_{p}"),
    (_HF_DEC + r"encoder_attn\.(?:o|out)_proj\.(?P<p>weight|bias)", _DEC + "cross_attn.out_proj.{p}"),
    (_HF_DEC + r"self_attn_layer_norm\.(?P<p>weight|bias)", _DEC + "norm1.{p}"),
    (_HF_DEC + r"encoder_attn_layer_norm\.(?P<p>weight|bias)", _DEC + "norm2.{p}"),
    (_HF_DEC + r"final_layer_norm\.(?P<p>weight|bias)", _DEC + "norm3.{p}"),
    (_HF_DEC + r"(?:mlp\.)?fc(?P<n>[12])\.(?P<p>weight|bias)", _DEC + "ffn.linear{n}.{p}"),
    (r"model\.transformer_module\.decoder\.layernorm\.(?P<p>weight|bias)", "transformer_decoder.decoder.norm.{p}"),
    (r"class_predictor\.(?P<p>weight|bias)", "head.class_embed.{p}"),
    (r"mask_embedder\.(?P<i>\d)\.0\.(?P<p>weight|bias)", "head.mask_embed.layers.{i}.{p}"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
)

# detectron2 ResNet (and detectron2's torchvision-converted R-50.pkl) -> timm ResNet
D2_RESNET: Rules = (
    (r"stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (rf"stem\.conv1\.norm\.{_P}", "backbone.body.bn1.{p}"),
    (r"res(?P<r>[2-5])\.(?P<b>\d+)\.conv(?P<c>\d)\.weight", "backbone.body.layer{r-1}.{b}.conv{c}.weight"),
    (rf"res(?P<r>[2-5])\.(?P<b>\d+)\.conv(?P<c>\d)\.norm\.{_P}", "backbone.body.layer{r-1}.{b}.bn{c}.{p}"),
    (r"res(?P<r>[2-5])\.(?P<b>\d+)\.shortcut\.weight", "backbone.body.layer{r-1}.{b}.downsample.0.weight"),
    (rf"res(?P<r>[2-5])\.(?P<b>\d+)\.shortcut\.norm\.{_P}", "backbone.body.layer{r-1}.{b}.downsample.1.{p}"),
)
# The official Swin (MaskFormer's D2SwinTransformer and Microsoft's ImageNet weights) -> timm Swin
OFFICIAL_SWIN: Rules = (
    (r"patch_embed\.(?P<rest>proj\.weight|proj\.bias|norm\.weight|norm\.bias)", "backbone.body.patch_embed.{rest}"),
    (r"layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<rest>(?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias)"
     r"|attn\.relative_position_bias_table)", "backbone.body.layers_{i}.blocks.{j}.{rest}"),
    (r"layers\.(?P<i>\d+)\.downsample\.(?P<rest>reduction\.weight|norm\.weight|norm\.bias)",
     "backbone.body.layers_{i+1}.downsample.{rest}"),
    (r"norm(?P<i>[0-3])\.(?P<p>weight|bias)", "backbone.norms.{i}.{p}"),
)
OFFICIAL_SWIN_IGNORED = (r".*relative_position_index", r".*attn_mask")
# The official MaskFormer head. BasePixelDecoder names its convs by the index of their input in
# res2..res5: layer_4 reads res5 (our top_conv), adapter_k/layer_k read res_{k+1}, finest last in ours.
_D2_PD = r"sem_seg_head\.pixel_decoder\."
_D2_PRED = r"sem_seg_head\.predictor\."
_ATTN = r"(?P<attn>self_attn|multihead_attn)"
D2_MASKFORMER: Rules = (
    (_D2_PD + r"layer_4\.weight", "pixel_decoder.top_conv.0.weight"),
    (_D2_PD + r"layer_4\.norm\.(?P<p>weight|bias)", "pixel_decoder.top_conv.1.{p}"),
    *((_D2_PD + rf"adapter_{k}\.weight", f"pixel_decoder.lateral_convs.{3 - k}.0.weight") for k in (1, 2, 3)),
    *((_D2_PD + rf"adapter_{k}\.norm\.(?P<p>weight|bias)", f"pixel_decoder.lateral_convs.{3 - k}.1.{{p}}")
      for k in (1, 2, 3)),
    *((_D2_PD + rf"layer_{k}\.weight", f"pixel_decoder.output_convs.{3 - k}.0.weight") for k in (1, 2, 3)),
    *((_D2_PD + rf"layer_{k}\.norm\.(?P<p>weight|bias)", f"pixel_decoder.output_convs.{3 - k}.1.{{p}}")
      for k in (1, 2, 3)),
    (_D2_PD + r"mask_features\.(?P<p>weight|bias)", "pixel_decoder.mask_features.{p}"),
    (_D2_PD + r"input_proj\.(?P<p>weight|bias)", "pixel_decoder.input_proj.{p}"),
    (_D2_PD + r"transformer\.encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<rest>in_proj_weight|in_proj_bias|"
     r"out_proj\.weight|out_proj\.bias)", "pixel_decoder.encoder.layers.{i}.self_attn.{rest}"),
    (_D2_PD + r"transformer\.encoder\.layers\.(?P<i>\d+)\.linear(?P<n>[12])\.(?P<p>weight|bias)",
     "pixel_decoder.encoder.layers.{i}.ffn.linear{n}.{p}"),
    (_D2_PD + r"transformer\.encoder\.layers\.(?P<i>\d+)\.norm(?P<n>[12])\.(?P<p>weight|bias)",
     "pixel_decoder.encoder.layers.{i}.norm{n}.{p}"),
    (_D2_PRED + r"query_embed\.weight", "transformer_decoder.query_embed.weight"),
    (_D2_PRED + r"input_proj\.(?P<p>weight|bias)", "transformer_decoder.input_proj.{p}"),
    (_D2_PRED + r"transformer\.(?P<part>encoder|decoder)\.layers\.(?P<i>\d+)\.self_attn\.(?P<rest>in_proj_weight|"
     r"in_proj_bias|out_proj\.weight|out_proj\.bias)", "transformer_decoder.{part}.layers.{i}.self_attn.{rest}"),
    (_D2_PRED + r"transformer\.decoder\.layers\.(?P<i>\d+)\.multihead_attn\.(?P<rest>in_proj_weight|in_proj_bias|"
     r"out_proj\.weight|out_proj\.bias)", "transformer_decoder.decoder.layers.{i}.cross_attn.{rest}"),
    (_D2_PRED + r"transformer\.(?P<part>encoder|decoder)\.layers\.(?P<i>\d+)\.linear(?P<n>[12])\.(?P<p>weight|bias)",
     "transformer_decoder.{part}.layers.{i}.ffn.linear{n}.{p}"),
    (_D2_PRED + r"transformer\.(?P<part>encoder|decoder)\.layers\.(?P<i>\d+)\.norm(?P<n>[123])\.(?P<p>weight|bias)",
     "transformer_decoder.{part}.layers.{i}.norm{n}.{p}"),
    (_D2_PRED + r"transformer\.decoder\.norm\.(?P<p>weight|bias)", "transformer_decoder.decoder.norm.{p}"),
    (_D2_PRED + r"class_embed\.(?P<p>weight|bias)", "head.class_embed.{p}"),
    (_D2_PRED + r"mask_embed\.layers\.(?P<i>\d)\.(?P<p>weight|bias)", "head.mask_embed.layers.{i}.{p}"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
)

# Mask2Former (fastmaskformer.Mask2Former's names follow the official ones where they can). Both
# sources have one FPN level (res2: adapter_1/layer_1), three encoder input levels coarsest first.
_ENC = "pixel_decoder.encoder.{i}."
_M2_DEC = "transformer_decoder.layers.{i}."
_MSDA = r"(?P<rest>(?:sampling_offsets|attention_weights|value_proj|output_proj)\.(?:weight|bias))"
_MHA = r"(?P<rest>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_HF_PD = r"model\.pixel_level_module\.decoder\."
_HF_ENC = _HF_PD + r"encoder\.layers\.(?P<i>\d+)\."
_HF_TM = r"model\.transformer_module\."
_HF_M2_DEC = _HF_TM + r"decoder\.layers\.(?P<i>\d+)\."
HF_MASK2FORMER: Rules = (  # everything after the backbone
    (_HF_PD + r"level_embed", "pixel_decoder.level_embed"),
    (_HF_PD + r"input_projections\.(?P<i>\d+)\.(?P<m>[01])\.(?P<p>weight|bias)",
     "pixel_decoder.input_proj.{i}.{m}.{p}"),
    (_HF_ENC + r"self_attn\." + _MSDA, _ENC + "self_attn.{rest}"),
    (_HF_ENC + r"self_attn_layer_norm\.(?P<p>weight|bias)", _ENC + "norm1.{p}"),
    (_HF_ENC + r"fc(?P<n>[12])\.(?P<p>weight|bias)", _ENC + "ffn.linear{n}.{p}"),
    (_HF_ENC + r"final_layer_norm\.(?P<p>weight|bias)", _ENC + "norm2.{p}"),
    (_HF_PD + r"mask_projection\.(?P<p>weight|bias)", "pixel_decoder.mask_features.{p}"),
    (_HF_PD + r"adapter_1\.(?P<m>[01])\.(?P<p>weight|bias)", "pixel_decoder.lateral_convs.0.{m}.{p}"),
    (_HF_PD + r"layer_1\.(?P<m>[01])\.(?P<p>weight|bias)", "pixel_decoder.output_convs.0.{m}.{p}"),
    (_HF_TM + r"queries_features\.weight", "transformer_decoder.query_feat.weight"),
    (_HF_TM + r"queries_embedder\.weight", "transformer_decoder.query_embed.weight"),
    (_HF_TM + r"level_embed\.weight", "transformer_decoder.level_embed.weight"),
    (_HF_TM + r"input_projections\.(?P<i>\d+)\.(?P<p>weight|bias)", "transformer_decoder.input_proj.{i}.{p}"),
    (_HF_M2_DEC + r"cross_attn\." + _MHA, _M2_DEC + "cross_attn.{rest}"),
    (_HF_M2_DEC + r"self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)", _M2_DEC + "self_attn.in_proj_{p}"),
    (_HF_M2_DEC + r"self_attn\.(?:o|out)_proj\.(?P<p>weight|bias)", _M2_DEC + "self_attn.out_proj.{p}"),
    (_HF_M2_DEC + r"cross_attn_layer_norm\.(?P<p>weight|bias)", _M2_DEC + "norm1.{p}"),
    (_HF_M2_DEC + r"self_attn_layer_norm\.(?P<p>weight|bias)", _M2_DEC + "norm2.{p}"),
    (_HF_M2_DEC + r"final_layer_norm\.(?P<p>weight|bias)", _M2_DEC + "norm3.{p}"),
    (_HF_M2_DEC + r"(?:mlp\.)?fc(?P<n>[12])\.(?P<p>weight|bias)", _M2_DEC + "ffn.linear{n}.{p}"),
    (_HF_TM + r"decoder\.layernorm\.(?P<p>weight|bias)", "transformer_decoder.norm.{p}"),
    (_HF_TM + r"decoder\.mask_predictor\.mask_embedder\.(?P<i>\d)\.0\.(?P<p>weight|bias)",
     "head.mask_embed.layers.{i}.{p}"),
    (r"class_predictor\.(?P<p>weight|bias)", "head.class_embed.{p}"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
)
# The official MSDeformAttnPixelDecoder (detectron2 Conv2d keeps its norm as ".norm") and
# MultiScaleMaskedTransformerDecoder (one ModuleList per sub-layer; "static_query" before version 2).
_D2_M2_ENC = _D2_PD + r"transformer\.encoder\.layers\.(?P<i>\d+)\."
D2_MASK2FORMER: Rules = (
    (_D2_PD + r"input_proj\.(?P<i>\d+)\.(?P<m>[01])\.(?P<p>weight|bias)", "pixel_decoder.input_proj.{i}.{m}.{p}"),
    (_D2_PD + r"transformer\.level_embed", "pixel_decoder.level_embed"),
    (_D2_M2_ENC + r"self_attn\." + _MSDA, _ENC + "self_attn.{rest}"),
    (_D2_M2_ENC + r"linear(?P<n>[12])\.(?P<p>weight|bias)", _ENC + "ffn.linear{n}.{p}"),
    (_D2_M2_ENC + r"norm(?P<n>[12])\.(?P<p>weight|bias)", _ENC + "norm{n}.{p}"),
    (_D2_PD + r"mask_features\.(?P<p>weight|bias)", "pixel_decoder.mask_features.{p}"),
    (_D2_PD + r"adapter_1\.weight", "pixel_decoder.lateral_convs.0.0.weight"),
    (_D2_PD + r"adapter_1\.norm\.(?P<p>weight|bias)", "pixel_decoder.lateral_convs.0.1.{p}"),
    (_D2_PD + r"layer_1\.weight", "pixel_decoder.output_convs.0.0.weight"),
    (_D2_PD + r"layer_1\.norm\.(?P<p>weight|bias)", "pixel_decoder.output_convs.0.1.{p}"),
    (_D2_PRED + r"(?:query_feat|static_query)\.weight", "transformer_decoder.query_feat.weight"),
    (_D2_PRED + r"query_embed\.weight", "transformer_decoder.query_embed.weight"),
    (_D2_PRED + r"level_embed\.weight", "transformer_decoder.level_embed.weight"),
    (_D2_PRED + r"input_proj\.(?P<i>\d+)\.(?P<p>weight|bias)", "transformer_decoder.input_proj.{i}.{p}"),
    (_D2_PRED + r"transformer_cross_attention_layers\.(?P<i>\d+)\.multihead_attn\." + _MHA,
     _M2_DEC + "cross_attn.{rest}"),
    (_D2_PRED + r"transformer_cross_attention_layers\.(?P<i>\d+)\.norm\.(?P<p>weight|bias)", _M2_DEC + "norm1.{p}"),
    (_D2_PRED + r"transformer_self_attention_layers\.(?P<i>\d+)\.self_attn\." + _MHA, _M2_DEC + "self_attn.{rest}"),
    (_D2_PRED + r"transformer_self_attention_layers\.(?P<i>\d+)\.norm\.(?P<p>weight|bias)", _M2_DEC + "norm2.{p}"),
    (_D2_PRED + r"transformer_ffn_layers\.(?P<i>\d+)\.linear(?P<n>[12])\.(?P<p>weight|bias)",
     _M2_DEC + "ffn.linear{n}.{p}"),
    (_D2_PRED + r"transformer_ffn_layers\.(?P<i>\d+)\.norm\.(?P<p>weight|bias)", _M2_DEC + "norm3.{p}"),
    (_D2_PRED + r"decoder_norm\.(?P<p>weight|bias)", "transformer_decoder.norm.{p}"),
    (_D2_PRED + r"class_embed\.(?P<p>weight|bias)", "head.class_embed.{p}"),
    (_D2_PRED + r"mask_embed\.layers\.(?P<i>\d)\.(?P<p>weight|bias)", "head.mask_embed.layers.{i}.{p}"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
)

# Backbone architectures by their shape -> timm names (the model takes those in modeling.BACKBONES).
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152"}
SWINS = {(96, (2, 2, 6, 2), (3, 6, 12, 24), 7): "swin_tiny_patch4_window7_224",
         (96, (2, 2, 18, 2), (3, 6, 12, 24), 7): "swin_small_patch4_window7_224",
         (128, (2, 2, 18, 2), (4, 8, 16, 32), 12): "swin_base_patch4_window12_384",
         (192, (2, 2, 18, 2), (6, 12, 24, 48), 12): "swin_large_patch4_window12_384"}


class UnmappedKeysError(KeyError):
    """Source keys that no rule of the source's table maps (pass allow_unmapped=True to drop them)."""

    def __str__(self) -> str:
        return str(self.args[0])


# -- the table engine ----------------------------------------------------------------------------
_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


def _fill(template: str, groups: Dict[str, str]) -> str:
    return _FIELD.sub(lambda m: str(int(groups[m.group(1)]) + int(m.group(2))) if m.group(2)
                      else groups[m.group(1)], template)


def remap(state: State, rules: Rules, ignored: Sequence[str] = (), prefix: str = "") -> Tuple[State, List[str]]:
    """``state`` translated by ``rules`` -> (the mapped state, the source keys no rule maps).
    Only keys starting with ``prefix`` are considered (it is stripped before matching); q/k/v thirds
    are concatenated once all three are there."""
    compiled = [(re.compile(p), t) for p, t in rules]
    skip = [re.compile(p) for p in ignored]
    out: State = {}
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        for pattern, template in compiled:
            m = pattern.fullmatch(name)
            if m:
                target = _fill(template, m.groupdict())
                if m.groupdict().get("qkv"):
                    parts.setdefault(target, {})["qkv".index(m.group("qkv")[0])] = value
                else:
                    out[target] = value
                break
        else:
            if not any(s.fullmatch(name) for s in skip):
                unmapped.append(key)
    for target, chunks in parts.items():
        if sorted(chunks) != [0, 1, 2]:
            raise KeyError(f"{target}: a fused q/k/v projection needs its q, k and v parts; the source has only "
                           f"{['qkv'[i] for i in sorted(chunks)]}")
        out[target] = torch.cat([chunks[i] for i in range(3)])
    return out, unmapped


# -- reading sources -----------------------------------------------------------------------------
class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles detectron2 checkpoints (dicts of NumPy arrays, strings and numbers) and nothing that
    could run code: only NumPy's array reconstruction is allowed as a global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a detectron2 checkpoint holds only "
                                         "NumPy arrays")
        return super().find_class(module, name)


def _tensors(obj, path: str) -> State:
    """A flat name -> tensor dict from a loaded checkpoint (unwrapping "model" / "state_dict")."""
    import numpy as np
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name -> array), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.array(v, order="C", copy=True))  # keeps 0-d arrays 0-d
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
    return out


def read_weights(path: str) -> State:
    """The tensors of a weights file: .pkl (detectron2), .safetensors, or a torch file (.pth, .pt, .bin)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: no file at {path!r}")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return _tensors(_NumpyUnpickler(f, encoding="latin1").load(), path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return _tensors(torch.load(path, map_location="cpu", weights_only=True), path)


def _hf_weights(folder: str) -> State:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return read_weights(os.path.join(folder, name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for s in shards for k, v in read_weights(os.path.join(folder, s)).items()}
    raise FileNotFoundError(f"{folder}: a Hugging Face folder needs model.safetensors or pytorch_model.bin (or a "
                            f"sharded index); found {sorted(os.listdir(folder))}")


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# -- configurations ------------------------------------------------------------------------------
def _backbone_name(kind: str, signature: tuple) -> str:
    from .modeling.backbone import ALIASES, BACKBONES
    table = RESNETS if kind == "resnet" else SWINS
    name = table.get(signature)
    if name is None:
        raise ValueError(f"backbone: the source's {kind} {signature} is none of the known architectures "
                         f"{sorted(table.items(), key=str)}")
    if name not in BACKBONES and name not in ALIASES:
        raise ValueError(f"backbone: the source's backbone is timm's {name!r}, which fastmaskformer.modeling.BACKBONES "
                         f"does not list (it has {sorted(BACKBONES)})")
    return name


def _hf_backbone(bb: dict) -> Tuple[str, Rules, Sequence[str]]:
    """The timm name and the table (prefixed) of a transformers ``backbone_config``."""
    kind = bb.get("model_type", "swin")
    if kind == "resnet":
        if bb.get("downsample_in_bottleneck") or bb.get("downsample_in_first_stage") or \
                bb.get("embedding_size", 64) != 64:
            raise ValueError("backbone_config: only the torchvision ResNet layout (stride in the 3x3 conv, 64-wide "
                             "stem) maps onto timm's ResNet")
        backbone = _backbone_name("resnet", (bb.get("layer_type", "bottleneck"), tuple(bb.get("depths", (3, 4, 6, 3)))))
        rules, ignored = HF_RESNET, ()
    elif kind in ("swin", "maskformer-swin"):
        if bb.get("use_absolute_embeddings") or bb.get("patch_size", 4) != 4 or bb.get("mlp_ratio", 4.0) != 4.0:
            raise ValueError("backbone_config: only Swin with patch 4, MLP ratio 4 and no absolute position "
                             "embedding maps onto timm's Swin")
        backbone = _backbone_name("swin", (bb.get("embed_dim", 96), tuple(bb.get("depths", (2, 2, 6, 2))),
                                           tuple(bb.get("num_heads", (3, 6, 12, 24))), bb.get("window_size", 7)))
        rules, ignored = HF_SWIN, HF_SWIN_IGNORED
    else:
        raise ValueError(f"backbone_config.model_type: expected 'resnet' or 'swin', got {kind!r}")
    prefix = re.escape("model.pixel_level_module.encoder.")
    return backbone, tuple((prefix + s, t) for s, t in rules), tuple(prefix + s for s in ignored)


def _hf_num_classes(cfg: dict, folder: str) -> int:
    num_classes = cfg.get("num_labels") or len(cfg.get("id2label") or {})
    if not num_classes:
        raise ValueError(f"{folder}/config.json: no id2label / num_labels to read the number of classes from")
    return int(num_classes)


def _hf_maskformer(cfg: dict, folder: str) -> dict:
    """MaskFormer keyword arguments of a ``MaskFormerForInstanceSegmentation`` config."""
    dec = cfg.get("decoder_config") or {}
    if dec.get("activation_function", "relu") != "relu":
        raise ValueError(f"decoder_config.activation_function: expected 'relu' (DETR's), got "
                         f"{dec['activation_function']!r}")
    return dict(num_queries=dec.get("num_queries", 100), hidden_dim=dec.get("d_model", 256),
                mask_dim=cfg.get("mask_feature_size", 256), nheads=dec.get("decoder_attention_heads", 8),
                dim_feedforward=dec.get("decoder_ffn_dim", 2048), dec_layers=dec.get("decoder_layers", 6), enc_layers=0,
                dropout=dec.get("dropout", 0.1), conv_dim=cfg.get("fpn_feature_size", 256), pixel_decoder="base",
                class_weight=cfg.get("cross_entropy_weight", 1.0), mask_weight=cfg.get("mask_weight", 20.0),
                dice_weight=cfg.get("dice_weight", 1.0), no_object_weight=cfg.get("no_object_weight", 0.1))


def _hf_mask2former(cfg: dict, folder: str) -> dict:
    """Mask2Former keyword arguments of a ``Mask2FormerForUniversalSegmentation`` config. transformers
    counts the initial prediction as a decoder layer (10 = 9 layers); its deformable encoder has 4
    points per head and level and the decoder's head count."""
    for key, expected in (("pre_norm", False), ("activation_function", "relu"), ("common_stride", 4)):
        if cfg.get(key, expected) != expected:
            raise ValueError(f"{folder}/config.json: {key}: fastmaskformer's Mask2Former supports {expected!r} only "
                             f"(the official recipes'), got {cfg[key]!r}")
    if tuple(cfg.get("feature_strides", (4, 8, 16, 32))) != (4, 8, 16, 32):
        raise ValueError(f"{folder}/config.json: feature_strides: expected [4, 8, 16, 32], got "
                         f"{cfg['feature_strides']}")
    hidden, conv = cfg.get("hidden_dim", 256), cfg.get("feature_size", 256)
    if cfg.get("enforce_input_projection") and hidden == conv:
        raise ValueError(f"{folder}/config.json: enforce_input_projection: fastmaskformer's Mask2Former projects the "
                         f"pixel decoder's maps only when feature_size ({conv}) differs from hidden_dim ({hidden})")
    layers = cfg.get("decoder_layers", 10)
    if layers < 2:
        raise ValueError(f"{folder}/config.json: decoder_layers: expected >= 2 (the initial prediction counts as "
                         f"one), got {layers}")
    heads = cfg.get("num_attention_heads", 8)
    return dict(num_queries=cfg.get("num_queries", 100), hidden_dim=hidden, mask_dim=cfg.get("mask_feature_size", 256),
                nheads=heads, dim_feedforward=cfg.get("dim_feedforward", 2048), dec_layers=layers - 1, conv_dim=conv,
                enc_layers=cfg.get("encoder_layers", 6), enc_nheads=heads, enc_n_points=4,
                enc_dim_feedforward=cfg.get("encoder_feedforward_dim", 1024), dropout=cfg.get("dropout", 0.0),
                deep_supervision=cfg.get("use_auxiliary_loss", True), class_weight=cfg.get("class_weight", 2.0),
                mask_weight=cfg.get("mask_weight", 5.0), dice_weight=cfg.get("dice_weight", 5.0),
                no_object_weight=cfg.get("no_object_weight", 0.1), num_points=cfg.get("train_num_points", 12544),
                oversample_ratio=cfg.get("oversample_ratio", 3.0),
                importance_sample_ratio=cfg.get("importance_sample_ratio", 0.75))


# config.json's model_type -> (fastmaskformer architecture, its keyword reader, its head table)
_HF_MODELS = {"maskformer": ("maskformer", _hf_maskformer, HF_MASKFORMER),
              "mask2former": ("mask2former", _hf_mask2former, HF_MASK2FORMER)}


def _hf_config(folder: str) -> Tuple[str, dict, Rules, Sequence[str]]:
    """(architecture, keyword arguments, table, ignored) of a transformers folder's config.json."""
    cfg = _json(os.path.join(folder, "config.json"))
    kind = cfg.get("model_type")
    if kind not in _HF_MODELS:
        raise ValueError(f"{folder}/config.json: model_type: expected 'maskformer' (MaskFormerForInstanceSegmentation) "
                         f"or 'mask2former' (Mask2FormerForUniversalSegmentation), got {kind!r}")
    arch, read, head_rules = _HF_MODELS[kind]
    if not isinstance(cfg.get("backbone_config"), dict):
        raise ValueError(f"{folder}/config.json: expected a backbone_config (a transformers ResNet or Swin); timm and "
                         f"named backbones are not converted")
    backbone, backbone_rules, ignored = _hf_backbone(cfg["backbone_config"])
    kwargs = dict(num_classes=_hf_num_classes(cfg, folder), backbone=backbone, **read(cfg, folder))
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        p = _json(pre)
        kwargs.update({k: tuple(p[h]) for k, h in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")) if h in p})
    return arch, kwargs, backbone_rules + head_rules, ignored


def _count(keys, pattern: str) -> Dict[int, set]:
    found: Dict[int, set] = {}
    for k in keys:
        m = re.fullmatch(pattern, k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def _d2_backbone(state: State, prefix: str) -> Tuple[str, Rules, Sequence[str]]:
    """The backbone of detectron2-named weights (under ``prefix``): its timm name and table."""
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if any(k.startswith("stem.conv2") for k in keys):
        raise ValueError("backbone: a ResNet with a deep (three-conv) stem, e.g. R101c, has no timm counterpart here")
    if any(k.startswith("conv1_w") or "_branch2a_" in k for k in keys):
        raise ValueError("backbone: this is a Caffe2-format MSRA ResNet (stride in the 1x1 conv, BGR input), not the "
                         "torchvision layout; use the torchvision-converted R-50.pkl (detectron2://ImageNetPretrained/"
                         "torchvision/R-50.pkl) or a torchvision/timm state dict")
    res = _count(keys, r"res(\d)\.(\d+)\..*")
    if res:
        kind = "bottleneck" if any(re.fullmatch(r"res\d\.\d+\.conv3\.weight", k) for k in keys) else "basic"
        depths = tuple(len(res.get(r, ())) for r in (2, 3, 4, 5))
        return _backbone_name("resnet", (kind, depths)), D2_RESNET, (r"stem\.fc\..*", r"fc\..*")
    blocks = _count(keys, r"layers\.(\d+)\.blocks\.(\d+)\..*")
    if blocks and "patch_embed.proj.weight" in keys:
        depths = tuple(len(blocks[i]) for i in sorted(blocks))
        heads = tuple(int(state[f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                      for i in sorted(blocks))
        table = state[f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        window = (int(round(table ** 0.5)) + 1) // 2
        embed = int(state[f"{prefix}patch_embed.proj.weight"].shape[0])
        return (_backbone_name("swin", (embed, depths, heads, window)), OFFICIAL_SWIN,
                OFFICIAL_SWIN_IGNORED + (r"norm\.(weight|bias)", r"head\..*"))
    raise ValueError(f"backbone: found neither detectron2 ResNet (res2..res5) nor Swin (layers.N.blocks) weights "
                     f"under {prefix!r}")


_PRED, _PD = "sem_seg_head.predictor.", "sem_seg_head.pixel_decoder."


def _shape(state: State, key: str, dim: int) -> int:
    if key not in state:
        raise KeyError(f"detectron2 checkpoint: expected the official key {key!r} (first keys: {sorted(state)[:5]})")
    return int(state[key].shape[dim])


def _d2_maskformer(state: State, nheads: int, enc_nheads: Optional[int]) -> dict:
    """MaskFormer keyword arguments read from the shapes of official detectron2 weights."""
    pred, pd = _PRED, _PD
    dec = _count(state, re.escape(pred) + r"transformer\.decoder\.layers\.(\d+)\.(.*)")
    enc = _count(state, re.escape(pred) + r"transformer\.encoder\.layers\.(\d+)\.(.*)")
    pd_enc = _count(state, re.escape(pd) + r"transformer\.encoder\.layers\.(\d+)\.(.*)")
    if pd_enc and enc:
        raise ValueError("detectron2 checkpoint: encoder layers both in the pixel decoder and in the predictor; "
                         "fastmaskformer.MaskFormer has one enc_layers for either place")
    return dict(num_classes=_shape(state, pred + "class_embed.weight", 0) - 1,
                num_queries=_shape(state, pred + "query_embed.weight", 0),
                hidden_dim=_shape(state, pred + "query_embed.weight", 1),
                mask_dim=_shape(state, pd + "mask_features.weight", 0), nheads=nheads,
                dim_feedforward=_shape(state, pred + "transformer.decoder.layers.0.linear1.weight", 0),
                dec_layers=len(dec), enc_layers=len(pd_enc) or len(enc),
                conv_dim=_shape(state, pd + "mask_features.weight", 1),
                pixel_decoder="transformer_encoder" if pd_enc else "base")


def _d2_mask2former(state: State, nheads: int, enc_nheads: Optional[int]) -> dict:
    """Mask2Former keyword arguments read from the shapes of official detectron2 weights. The head
    counts are not in the weights (official: 8 for both; the encoder's follows ``nheads`` as in the
    official config); the points per head and level follow from them."""
    pred, pd = _PRED, _PD
    enc_nheads = nheads if enc_nheads is None else enc_nheads
    query = pred + ("query_feat.weight" if pred + "query_feat.weight" in state else "static_query.weight")
    levels = _shape(state, pd + "transformer.level_embed", 0)
    if levels != 3:
        raise ValueError(f"detectron2 checkpoint: the deformable encoder reads {levels} levels; fastmaskformer's "
                         f"Mask2Former reads res3..res5 (3), as the official recipes do")
    if any(k.startswith(pd + "adapter_2.") for k in state):
        raise ValueError("detectron2 checkpoint: more than one FPN level in the pixel decoder (COMMON_STRIDE < 4); "
                         "fastmaskformer's Mask2Former has one (res2)")
    rows = _shape(state, pd + "transformer.encoder.layers.0.self_attn.attention_weights.weight", 0)
    if rows % (enc_nheads * levels):
        raise ValueError(f"enc_nheads: the encoder's attention weights have {rows} rows, not a multiple of "
                         f"enc_nheads * levels = {enc_nheads} * {levels}; pass the checkpoint's enc_nheads=")
    hidden, conv = _shape(state, query, 1), _shape(state, pd + "mask_features.weight", 1)
    if hidden == conv and pred + "input_proj.0.weight" in state:
        raise ValueError("detectron2 checkpoint: ENFORCE_INPUT_PROJ (a projection between equal widths) is not "
                         "supported; fastmaskformer's Mask2Former projects only between different widths")
    return dict(num_classes=_shape(state, pred + "class_embed.weight", 0) - 1, num_queries=_shape(state, query, 0),
                hidden_dim=hidden, mask_dim=_shape(state, pd + "mask_features.weight", 0), nheads=nheads,
                dim_feedforward=_shape(state, pred + "transformer_ffn_layers.0.linear1.weight", 0),
                dec_layers=len(_count(state, re.escape(pred) + r"transformer_self_attention_layers\.(\d+)\.(.*)")),
                conv_dim=conv,
                enc_layers=len(_count(state, re.escape(pd) + r"transformer\.encoder\.layers\.(\d+)\.(.*)")),
                enc_nheads=enc_nheads, enc_n_points=rows // (enc_nheads * levels),
                enc_dim_feedforward=_shape(state, pd + "transformer.encoder.layers.0.linear1.weight", 0))


def _d2_config(state: State, nheads: int, enc_nheads: Optional[int] = None) -> Tuple[str, dict, Rules, Sequence[str]]:
    """(architecture, keyword arguments, table, ignored) of official detectron2 weights: Mask2Former
    if its decoder's per-sub-layer lists are there, MaskFormer otherwise."""
    for key in (_PRED + "class_embed.weight", _PD + "mask_features.weight"):
        if key not in state:
            raise KeyError(f"detectron2 checkpoint: expected the official MaskFormer / Mask2Former key {key!r}; is "
                           f"this a MaskFormer or Mask2Former checkpoint? (first keys: {sorted(state)[:5]})")
    mask2former = any(k.startswith(_PRED + "transformer_self_attention_layers.") for k in state)
    arch, read, head_rules = (("mask2former", _d2_mask2former, D2_MASK2FORMER) if mask2former
                              else ("maskformer", _d2_maskformer, D2_MASKFORMER))
    backbone, rules, ignored = _d2_backbone(state, "backbone.")
    kwargs = dict(backbone=backbone, **read(state, nheads, enc_nheads))
    backbone_rules = tuple((r"backbone\." + s, t) for s, t in rules)
    return arch, kwargs, backbone_rules + head_rules, tuple(r"backbone\." + s for s in ignored)


# -- loading into models -------------------------------------------------------------------------
def _load_checked(module: torch.nn.Module, mapped: State, unmapped: List[str], allow_unmapped: bool,
                  source: str, prefix: str = "") -> None:
    """Copy ``mapped`` (keys relative to ``module``, after stripping ``prefix``) into ``module``; every
    target key must exist with the same shape, and every module key must be filled (BatchNorm's
    ``num_batches_tracked`` and the criterion's buffer excepted)."""
    if unmapped and not allow_unmapped:
        raise UnmappedKeysError(f"{source}: {len(unmapped)} key(s) no conversion rule maps: {unmapped[:20]}"
                                f"{' ...' if len(unmapped) > 20 else ''} (pass allow_unmapped=True / "
                                f"--allow-unmapped to drop them)")
    mapped = {k[len(prefix):]: v for k, v in mapped.items() if k.startswith(prefix)}
    own = module.state_dict()
    unknown = sorted(set(mapped) - set(own))
    if unknown:
        raise KeyError(f"{source}: converted keys that the model does not have: {unknown[:20]} (does the model's "
                       f"configuration match the source's?)")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
    optional = ("num_batches_tracked", "criterion.empty_weight")
    missing = sorted(k for k in set(own) - set(mapped) if not k.endswith(optional))
    if missing:
        raise KeyError(f"{source}: the model's {missing[:20]}{' ...' if len(missing) > 20 else ''} got no weights "
                       f"({len(missing)} in all)")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))


def _backbone_rules(state: State, name: str) -> Tuple[State, Rules, Sequence[str], str]:
    """Backbone-only weights in any supported layout -> (state, table, ignored, source prefix)."""
    keys = set(state)
    if any(k.startswith("backbone.body.") for k in keys):  # a fastmaskformer checkpoint
        return state, ((r"(?P<k>backbone\.(?:body|norms)\..*)", "{k}"),), (r"(?!backbone\.).*",), ""
    if name.startswith("resnet"):
        if "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys):  # timm / torchvision
            return state, ((r"(?P<k>(?:conv1|bn1|layer[1-4])\..*)", "backbone.body.{k}"),), (r"fc\..*",), ""
        prefix = "backbone." if any(k.startswith("backbone.") for k in keys) else ""
        _d2_backbone(state, prefix)  # raises for the layouts that do not map
        return state, D2_RESNET, (r"stem\.fc\..*", r"fc\..*"), prefix
    if any(k.startswith("layers.0.downsample.") for k in keys) or any(re.match(r"norm\d\.", k) for k in keys):
        return state, OFFICIAL_SWIN, OFFICIAL_SWIN_IGNORED + (r"norm\.(weight|bias)", r"head\..*"), ""
    timm_swin = ((r"layers\.(?P<i>\d)\.(?P<rest>.*)", "backbone.body.layers_{i}.{rest}"),
                 (r"(?P<k>patch_embed\..*)", "backbone.body.{k}"))
    return state, timm_swin, OFFICIAL_SWIN_IGNORED + (r"norm\.(weight|bias)", r"head\..*"), ""


def load_backbone_weights(backbone: torch.nn.Module, path: str, allow_unmapped: bool = False) -> None:
    """Load ImageNet (or any backbone-only) weights into a :class:`fastmaskformer.modeling.Backbone`:
    timm / torchvision ResNet state dicts, detectron2's torchvision-converted ``R-50.pkl``, timm or
    official Swin weights, or the backbone of a fastmaskformer checkpoint. Classifier heads are
    dropped; the Swin output norms keep their initialization unless the file has them."""
    path = os.fspath(path)
    state, rules, ignored, prefix = _backbone_rules(read_weights(path), backbone.name)
    mapped, unmapped = remap(state, rules, ignored, prefix)
    mapped = {k[len("backbone."):]: v for k, v in mapped.items()}
    if backbone.norms is not None and not any(k.startswith("norms.") for k in mapped):
        mapped.update({k: v for k, v in backbone.state_dict().items() if k.startswith("norms.")})
    _load_checked(backbone, mapped, unmapped, allow_unmapped, path)


# -- whole models --------------------------------------------------------------------------------
def convert_state(src: str, nheads: int = 8, enc_nheads: Optional[int] = None
                  ) -> Tuple[str, dict, State, List[str]]:
    """(architecture "maskformer" or "mask2former", its keyword arguments, the converted state dict,
    the unmapped source keys) of a source. ``nheads`` / ``enc_nheads``: the head counts of a .pkl,
    whose weights do not show them (Mask2Former's encoder follows ``nheads`` unless given)."""
    src = os.fspath(src)
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(f"{src}: a Hugging Face folder needs config.json")
        arch, kwargs, rules, ignored = _hf_config(src)
        state = _hf_weights(src)
    elif src.endswith(".pkl"):
        state = read_weights(src)
        arch, kwargs, rules, ignored = _d2_config(state, nheads, enc_nheads)
    else:
        raise ValueError(f"src: expected a Hugging Face folder or a detectron2 .pkl, got {src!r}")
    mapped, unmapped = remap(state, rules, ignored)
    return arch, kwargs, mapped, unmapped


def _defaults(cls: type) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _model_config(arch: str, cls: type, kwargs: dict):
    """(the trainer's Config for ``cls(**kwargs)``, the arguments ModelConfig has no field for).
    Fields the source does not set take ``cls``'s defaults, not ModelConfig's (Mask2Former's loss
    weights differ from MaskFormer's)."""
    from .config import Config, ModelConfig
    cfg = Config()
    cfg.model.meta_architecture = arch
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {}
    for k, v in {**_defaults(cls), **kwargs}.items():
        if k == "num_classes":
            cfg.data.num_classes = v
        elif k in fields:
            setattr(cfg.model, k, tuple(v) if isinstance(v, list) else v)
        elif k in kwargs:
            extra[k] = v
    return cfg, extra


def _build(path: str, model_class: Optional[type], allow_unmapped: bool, overrides: dict):
    """(model, its architecture name, its constructor arguments) for ``from_pretrained``."""
    from .engine.build import model_class as class_of
    path = os.fspath(path)
    if os.path.isfile(path) and not path.endswith(".pkl"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise ValueError(f"path: expected a checkpoint with 'model' and 'config' (as convert writes it), got "
                             f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
        kwargs = dict(ckpt["config"]["model"])
        arch = kwargs.pop("meta_architecture", "maskformer")
        kwargs.update(ckpt.get("model_kwargs") or {})  # what convert could not write into the config
        kwargs["num_classes"] = ckpt["config"]["data"]["num_classes"]
        mapped, unmapped = ckpt["model"], []
    else:
        arch, kwargs, mapped, unmapped = convert_state(path, overrides.get("nheads", 8), overrides.get("enc_nheads"))
    cls = class_of(arch)
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, cls)):
            raise ValueError(f"model_class: {path} holds a {cls.__name__} checkpoint, which converts to "
                             f"fastmaskformer.{cls.__name__} (or a subclass); got "
                             f"{getattr(model_class, '__name__', model_class)!r}")
        cls = model_class
    accepted = _defaults(cls).keys() | {"num_classes"}
    # Config fields of the other architecture (e.g. MaskFormer's pixel_decoder) are not the class's arguments.
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    kwargs.update(overrides)
    model = cls(**kwargs)
    _load_checked(model, mapped, unmapped, allow_unmapped, path)
    return model, arch, kwargs


def from_pretrained(path: str, model_class: Optional[type] = None, allow_unmapped: bool = False, **overrides):
    """A model with the weights and configuration of ``path``: a Hugging Face MaskFormer or Mask2Former
    folder, an official detectron2 MaskFormer or Mask2Former ``.pkl``, or a checkpoint written by
    ``convert`` or the trainer (``{"model", "config"}``). The class is the source's (``model_class``,
    if given, must be it or a subclass). ``overrides`` replace constructor arguments (e.g.
    ``fused=True``, or ``nheads=`` / ``enc_nheads=`` for a .pkl, whose head counts the weights do not
    show)."""
    return _build(path, model_class, allow_unmapped, overrides)[0]


def convert(src: str, out: str, allow_unmapped: bool = False, **overrides) -> str:
    """Convert ``src`` to ``out`` (.pth) and write the config next to it (``out`` with .yaml);
    returns the config's path. Constructor arguments that the config has no field for (e.g.
    Mask2Former's ``enc_dim_feedforward``) are kept in the checkpoint for ``from_pretrained``; when
    they differ from the class's defaults a warning says that a model built from the .yaml alone
    would not take these weights."""
    from .config import save_config, to_dict
    from .engine.checkpoint import save_atomic
    model, arch, kwargs = _build(src, None, allow_unmapped, overrides)
    cfg, extra = _model_config(arch, type(model), kwargs)
    defaults = _defaults(type(model))
    differ = {k: v for k, v in extra.items() if k in defaults and _plain(v) != _plain(defaults[k])}
    if differ:
        warnings.warn(f"{out}: the config has no fields for {differ} (the class defaults are "
                      f"{ {k: defaults[k] for k in differ} }); from_pretrained({out!r}) restores them, but train / "
                      f"evaluate with the .yaml build the defaults, which these weights do not fit", stacklevel=2)
    save_atomic({"model": model.state_dict(), "config": to_dict(cfg), "model_kwargs": extra}, out)
    yaml_path = os.path.splitext(out)[0] + ".yaml"
    save_config(cfg, yaml_path)
    return yaml_path


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def main(argv: Optional[Sequence[str]] = None) -> str:
    import yaml
    p = argparse.ArgumentParser(prog="python -m fastmaskformer.convert",
                                description="Convert a Hugging Face or detectron2 MaskFormer / Mask2Former checkpoint.")
    p.add_argument("src", help="a Hugging Face save_pretrained folder, or an official detectron2 .pkl")
    p.add_argument("out", help="the checkpoint to write (.pth); its config goes next to it as .yaml")
    p.add_argument("--allow-unmapped", action="store_true", help="drop source keys that no rule maps")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                   help="model arguments to override, e.g. nheads=8 (values parsed as YAML)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep:
            p.error(f"{item}: expected FIELD=VALUE")
        overrides[key.strip()] = yaml.safe_load(text)
    yaml_path = convert(args.src, args.out, args.allow_unmapped, **overrides)
    print(f"wrote {args.out} and {yaml_path}\nevaluate with: python -m fastmaskformer.evaluate --config {yaml_path} "
          f"--checkpoint {args.out} data.name=... data.root=...")
    return yaml_path


if __name__ == "__main__":
    main()
