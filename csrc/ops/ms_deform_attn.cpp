// Schema of multi-scale deformable attention (Deformable DETR's MSDeformAttn core, Mask2Former's
// pixel decoder), and its backward as an op of its own (fake kernels and autograd:
// fastmaskformer/_ext.py).
//
//   ms_deform_attn_forward(value [B, S, heads, dh], spatial_shapes int64 [L, 2] (H_l, W_l),
//                          level_start_index int64 [L], sampling_locations [B, Lq, heads, L, P, 2]
//                          (x, y) in [0, 1], attention_weights [B, Lq, heads, L, P]) -> [B, Lq, heads*dh]
//       out[b, q, h*dh + c] = sum over (l, p) of attention_weights[b, q, h, l, p] times level l of
//       value (rows level_start_index[l] .. + H_l W_l, an H_l x W_l image) sampled at the location
//       as F.grid_sample(bilinear, zeros padding, align_corners=False) samples 2 loc - 1.
//       value, sampling_locations and attention_weights share one dtype: float32, float16 or
//       bfloat16 (math and accumulation in fp32); the output has that dtype.
//   ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
//                           attention_weights) -> (grad_value, grad_sampling_locations,
//                           grad_attention_weights), each in its input's dtype and shape.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}
