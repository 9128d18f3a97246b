"""Independent float64 NumPy versions of the point-sampled formulas (bilinear sampling with zero
padding, multi-scale deformable attention, point BCE and dice), written loop by loop from
grid_sample's documented rules (align_corners=False) and the papers. Tests compare the library
against these, never against itself."""
import numpy as np


def bilinear_taps(x, y, h, w):
    """(row, col, weight) of the in-bounds taps of point (x, y) in [0, 1] units of a h x w map:
    pixel centre (i, j) sits at ((j + 0.5) / w, (i + 0.5) / h); taps outside the map read zero."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    fx, fy = px - x0, py - y0
    taps = []
    for row, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for col, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= row < h and 0 <= col < w:
                taps.append((row, col, wy * wx))
    return taps


def bilinear_sample(img, x, y):
    """img [h, w] or [h, w, C] -> the bilinear value(s) at (x, y), zero outside."""
    h, w = img.shape[:2]
    out = np.zeros(img.shape[2:])
    for row, col, wt in bilinear_taps(x, y, h, w):
        out = out + wt * img[row, col]
    return out


def ms_deform_attn(value, shapes, locations, weights):
    """value [B, S, M, D], shapes [(h, w)] per level, locations [B, Lq, M, L, P, 2] (x, y),
    weights [B, Lq, M, L, P] -> [B, Lq, M*D]: sum over levels and points of weight x bilinear sample
    of the level's [h, w, D] map of head m."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = np.zeros((B, Lq, M, D))
    for b in range(B):
        for m in range(M):
            for lvl, (h, w) in enumerate(shapes):
                level = value[b, starts[lvl]:starts[lvl + 1], m].reshape(h, w, D)
                for q in range(Lq):
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p]
                        out[b, q, m] += weights[b, q, m, lvl, p] * bilinear_sample(level, x, y)
    return out.reshape(B, Lq, M * D)


def ms_deform_attn_value_grad(value_shape, shapes, locations, weights, grad_out):
    """d(sum(out * grad_out)) / d(value) of :func:`ms_deform_attn`, tap by tap."""
    B, S, M, D = value_shape
    _, Lq, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    g = grad_out.reshape(B, Lq, M, D)
    grad = np.zeros(value_shape)
    for b in range(B):
        for m in range(M):
            for lvl, (h, w) in enumerate(shapes):
                for q in range(Lq):
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p]
                        for row, col, wt in bilinear_taps(x, y, h, w):
                            grad[b, starts[lvl] + row * w + col, m] += weights[b, q, m, lvl, p] * wt * g[b, q, m]
    return grad


def bce(x, t):
    """Binary cross-entropy of logit x against target t in [0, 1], elementwise."""
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * t


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def point_costs(x, t):
    """x [Q, P] logits, t [N, P] -> (bce [Q, N] mean over points, dice [Q, N] with +1 smoothing)."""
    Q, N = x.shape[0], t.shape[0]
    c_bce, c_dice = np.zeros((Q, N)), np.zeros((Q, N))
    for q in range(Q):
        s = sigmoid(x[q])
        for n in range(N):
            c_bce[q, n] = bce(x[q], t[n]).mean()
            c_dice[q, n] = 1 - (2 * (s * t[n]).sum() + 1) / (s.sum() + t[n].sum() + 1)
    return c_bce, c_dice


def point_losses(x, t, num_masks):
    """x, t [N, P] -> (sum_n mean_p BCE / num_masks, sum_n dice / num_masks)."""
    lm = sum(bce(xi, ti).mean() for xi, ti in zip(x, t))
    ld = sum(1 - (2 * (sigmoid(xi) * ti).sum() + 1) / (sigmoid(xi).sum() + ti.sum() + 1) for xi, ti in zip(x, t))
    return lm / num_masks, ld / num_masks


def sample_masks(masks, coords):
    """masks [M, h, w], coords [P, 2] -> [M, P]: every mask read bilinearly at every point."""
    return np.array([[bilinear_sample(m, x, y) for x, y in coords] for m in masks]).reshape(len(masks), len(coords))


def point_matching_cost(logits, masks, labels, target_masks, coords, cost_class, cost_mask, cost_dice):
    """One image: logits [Q, K+1], masks [Q, h, w], labels [N], target_masks [N, H, W], coords [P, 2]
    -> C [Q, N] = cost_class * -softmax[label] + cost_mask * point BCE + cost_dice * point dice."""
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    c_bce, c_dice = point_costs(sample_masks(masks, coords), sample_masks(target_masks.astype(np.float64), coords))
    return cost_class * -prob[:, labels] + cost_mask * c_bce + cost_dice * c_dice
