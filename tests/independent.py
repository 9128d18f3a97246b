"""Independent float64 NumPy versions of MaskFormer's formulas, written from the paper and
F.interpolate's documented sampling rules, loop by loop. Tests compare the library against these,
never against itself."""
import numpy as np


def nearest_index(dst, n_in, n_out):
    """F.interpolate(mode="nearest"): src = floor(dst * in / out), scale in float32 as ATen does."""
    scale = np.float32(n_in) / np.float32(n_out)
    return min(int(np.floor(np.float32(dst) * scale)), n_in - 1)


def nearest_resize(mask, size):
    h, w = size
    H, W = mask.shape
    return np.array([[mask[nearest_index(y, H, h), nearest_index(x, W, w)] for x in range(w)] for y in range(h)])


def bilinear_resize(x, size):
    """F.interpolate(mode="bilinear", align_corners=False) of one 2-d map, pixel by pixel."""
    H, W = size
    h, w = x.shape

    def taps(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = np.empty((H, W))
    for y in range(H):
        y0, y1, ly = taps(y, h, H)
        for xx in range(W):
            x0, x1, lx = taps(xx, w, W)
            out[y, xx] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1])
                          + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
    return out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def focal_per_pixel(x, t, alpha=0.25, gamma=2.0):
    p = sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return a_t * (1 - p_t) ** gamma * ce


def dice(x, t):
    p = sigmoid(x)
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def mask_losses(pred, tgt, num_masks, alpha=0.25, gamma=2.0):
    """(loss_mask, loss_dice) of low-res logits pred [N,h,w] against targets [N,H,W]."""
    lm = ld = 0.0
    for x, t in zip(pred, tgt):
        xu = bilinear_resize(x, t.shape)
        lm += focal_per_pixel(xu, t, alpha, gamma).mean()
        ld += dice(xu, t)
    return lm / num_masks, ld / num_masks


def matching_cost(logits, masks, labels, tmasks, w_class=1.0, w_mask=1.0, w_dice=1.0, alpha=0.25, gamma=2.0):
    """Cost [Q, N] of one image: logits [Q,K+1], masks [Q,h,w], labels [N], tmasks [N,H,W]."""
    Q, N = logits.shape[0], len(labels)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    prob = e / e.sum(-1, keepdims=True)
    h, w = masks.shape[1:]
    t_small = [nearest_resize(t, (h, w)).astype(np.float64) for t in tmasks]
    C = np.zeros((Q, N))
    for q in range(Q):
        for j in range(N):
            t = t_small[j]
            p = sigmoid(masks[q])
            pos = alpha * (1 - p) ** gamma * -np.log(p)
            neg = (1 - alpha) * p ** gamma * -np.log(1 - p)
            focal = (pos * t + neg * (1 - t)).mean()
            C[q, j] = w_class * -prob[q, labels[j]] + w_mask * focal + w_dice * dice(masks[q], t)
    return C
