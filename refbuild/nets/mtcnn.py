"""facenet-pytorch's MTCNN cascade (`detect_face`), re-implemented to run faster on CPU.

Same weights (facenet-pytorch's `data/{p,r,o}net.pt`), same arithmetic, same boxes (bit-identical
on the celeba_wild_identity photos). We re-implement rather than call
`facenet_pytorch.models.utils.detect_face` because a profile of it on real photos (one torch
thread, 48 celeba_wild_identity photos) put only ~26% of its time in convolutions:

- `nn.MaxPool2d(ceil_mode=True)` (PNet/RNet/ONet): ~25%. torch's CPU kernel for these small
  float maps is ~10x slower than the max of k x k strided slices (`max_pool_ceil`; max is exact,
  so the result is bit-identical). This is most of our single-thread gain.
- Importing facenet-pytorch imports torchvision (for `batched_nms`), which imports torch._dynamo:
  ~2 s of every worker process's start. `nms`/`batched_nms` here are torchvision's CPU kernel
  (stable descending sort, float32 IoU compared in double) in numpy; `load_nets` reads the
  weights from facenet-pytorch's data folder without importing the package.

Kept as facenet does it, after measuring alternatives: the resizing, `F.interpolate(mode="area")`
(~22%: ~15 points on the pyramid, the rest on one call per RNet/ONet crop). Exact integer window
sums (row/column gathers of the uint8 image, even with R, G, B packed in one int64) were
bit-identical but no faster on 2-core AVX-512 CPU: their cost is the crops' pixels, as is torch's.
Also kept: the pyramid scales, the P/R/O-Net layers and memory formats, the box regression /
`rerec` / `pad` arithmetic in float32 torch ops in facenet's order, the NMS thresholds and tie
orders, the 512-crop chunks, and the failure on a candidate box wholly outside the image.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- layers


def _pool_len(n: int, k: int, s: int) -> int:
    """Output length of MaxPool(k, s, ceil_mode=True, padding=0) over n (torch's rule)."""
    out = -(-(n - k) // s) + 1
    return out - 1 if (out - 1) * s >= n else out


def max_pool_ceil(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """`F.max_pool2d(x, k, s, ceil_mode=True)` as maxima of strided slices; N,C,H,W -> N,C,oh,ow."""
    h, w = x.shape[-2:]
    oh, ow = _pool_len(h, k, s), _pool_len(w, k, s)
    ph, pw = (oh - 1) * s + k - h, (ow - 1) * s + k - w
    if ph > 0 or pw > 0:  # the last window hangs over the edge: its missing part never wins
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=float("-inf"))
    rows = x[..., 0 : (oh - 1) * s + 1 : s, :]
    for t in range(1, k):
        rows = torch.maximum(rows, x[..., t : t + (oh - 1) * s + 1 : s, :])
    out = rows[..., 0 : (ow - 1) * s + 1 : s]
    for t in range(1, k):
        out = torch.maximum(out, rows[..., t : t + (ow - 1) * s + 1 : s])
    return out


class PNet(nn.Module):
    """facenet-pytorch's PNet (same parameter names), fully convolutional."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B,3,H,W normalised -> (regression B,4,h,w; face probability B,h,w)."""
        x = max_pool_ceil(self.prelu1(self.conv1(x)), 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


class RNet(nn.Module):
    """facenet-pytorch's RNet (same parameter names) on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K,3,24,24 -> (regression K,4; face probability K)."""
        x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()  # facenet's (W, H, C) flattening
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """facenet-pytorch's ONet (same parameter names) on 48x48 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K,3,48,48 -> (regression K,4; landmarks K,10; face probability K)."""
        x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
        x = max_pool_ceil(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


def weights_dir() -> str:
    """facenet-pytorch's `data/` folder, found without importing the package (and torchvision)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("facenet-pytorch is not installed; it ships the MTCNN weights")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_nets(device: torch.device | str = "cpu") -> tuple[PNet, RNet, ONet]:
    """P/R/O-Net with facenet-pytorch's pretrained weights, in eval mode on `device`."""
    nets = []
    for cls, name in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
        net = cls()
        net.load_state_dict(torch.load(os.path.join(weights_dir(), f"{name}.pt"), map_location="cpu"))
        nets.append(net.to(device).eval())
    return nets[0], nets[1], nets[2]


# --------------------------------------------------------------------------- resizing


class Resizer:
    """facenet's resizing, `F.interpolate(mode="area")` of the float image. facenet resizes the
    channels-last view its permute leaves (B, 3, H, W with NHWC strides), and the nets then see
    channels-last inputs. The area kernel is ~1.7x faster on a contiguous NCHW copy and gives the
    same values bit for bit, so we resize that and hand PNet a channels-last level, as facenet does
    (its crops come out NCHW-contiguous either way)."""

    def __init__(self, imgs_u8: torch.Tensor):
        self.imgs = imgs_u8.permute(0, 3, 1, 2).float().contiguous()  # B, 3, H, W (NCHW)

    def level(self, oh: int, ow: int) -> torch.Tensor:
        """The pyramid level: B, 3, oh, ow (channels-last)."""
        return F.interpolate(self.imgs, size=(oh, ow), mode="area").contiguous(memory_format=torch.channels_last)

    def crops(self, inds: np.ndarray, y0: np.ndarray, x0: np.ndarray, ch: np.ndarray, cw: np.ndarray,
              size: int) -> torch.Tensor:
        """Crop k (image inds[k], rows y0.., cols x0.., ch x cw) resized to size x size: K, 3, size, size.
        One call per crop: crops differ in size, and a batched exact area resize (integer window sums by
        gathers) measured no faster on CPU, its cost being the crops' pixels either way."""
        pool, imgs = torch._C._nn.adaptive_avg_pool2d, self.imgs  # = F.interpolate(mode="area"), minus its Python
        out = [pool(imgs[i, :, y : y + h, x : x + w][None], (size, size))
               for i, y, x, h, w in zip(inds, y0, x0, ch, cw)]
        return torch.cat(out) if out else torch.empty(0, 3, size, size, device=self.imgs.device)  # NCHW, as facenet's


# --------------------------------------------------------------------------- NMS


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision.ops.nms (CPU kernel): greedy, IoU without +1, float32, scores sorted stably descending."""
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.long)
    order = scores.cpu().sort(dim=0, descending=True, stable=True)[1].numpy()  # torchvision sorts stably
    b = boxes.cpu().numpy()[order]  # N, 4 by score
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    alive = np.ones(len(b), bool)
    keep = []
    for i in range(len(b)):
        if not alive[i]:
            continue
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[i + 1 :]) - np.maximum(x1[i], x1[i + 1 :]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[i + 1 :]) - np.maximum(y1[i], y1[i + 1 :]))
        inter = w * h
        iou = inter / (area[i] + area[i + 1 :] - inter)
        alive[i + 1 :] &= ~(iou.astype(np.float64) > threshold)  # float vs double, as in C++
    return torch.from_numpy(order[keep])


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms: NMS per image index (coordinate-offset trick up to 1,000 boxes)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    boxes, scores, idxs = boxes.cpu(), scores.cpu(), idxs.cpu()
    if boxes.numel() > 4000:  # torchvision's per-index loop: kept indices ascending, then sorted by score
        kept = torch.zeros(len(scores), dtype=torch.bool)
        for i in torch.unique(idxs):
            members = torch.nonzero(idxs == i).view(-1)
            kept[members[nms(boxes[members], scores[members], threshold)]] = True
        keep = torch.nonzero(kept).view(-1)
        return keep[scores[keep].sort(descending=True)[1]]
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, threshold)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet's `nms_numpy(..., "Min")` (ONet stage): overlap over the smaller area, +1 areas."""
    x1, y1, x2, y2 = (boxes[:, j].copy() for j in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)  # ascending, numpy's default sort: facenet's tie order
    pick = []
    while order.size > 0:
        i, rest = order[-1], order[:-1]
        pick.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[w * h / np.minimum(area[i], area[rest]) <= threshold]
    return np.asarray(pick, dtype=np.int64)


def batched_nms_min(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, threshold: float) -> torch.Tensor:
    """facenet's `batched_nms_numpy`: per image via a coordinate offset, then `nms_min`."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    shifted = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]
    return torch.from_numpy(nms_min(shifted.cpu().numpy(), scores.cpu().numpy(), threshold))


# --------------------------------------------------------------------------- box arithmetic (facenet's)


def _generate_boxes(reg: torch.Tensor, probs: torch.Tensor, scale: float, thresh: float):
    """PNet cells over `thresh` -> (boxes N,9 = x0,y0,x1,y1,score,reg x4; image index N)."""
    mask = probs >= thresh  # B, h, w
    where = mask.nonzero()
    score = probs[mask]
    reg = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    bb = where[:, 1:].type(reg.dtype).flip(1)
    q1 = ((2 * bb + 1) / scale).floor()
    q2 = ((2 * bb + 12 - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1), where[:, 0]


def _bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    b1 = boxes[:, 0] + reg[:, 0] * w
    b2 = boxes[:, 1] + reg[:, 1] * h
    b3 = boxes[:, 2] + reg[:, 2] * w
    b4 = boxes[:, 3] + reg[:, 3] * h
    boxes[:, :4] = torch.stack([b1, b2, b3, b4]).permute(1, 0)
    return boxes


def _rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes made square around their centre (in place, as facenet)."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side.repeat(2, 1).permute(1, 0)
    return boxes


def _pad(boxes: torch.Tensor, w: int, h: int) -> tuple[np.ndarray, ...]:
    """Integer crop bounds (1-based y, x; inclusive ey, ex), clipped to the image."""
    b = boxes.trunc().int().cpu().numpy()
    x, y, ex, ey = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def _crops(src: Resizer, boxes: torch.Tensor, inds: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised size x size crops of the boxes (K,3,size,size). A box wholly outside the image
    makes facenet's detect_face fail (its crop list comes out shorter than its box list): so do we."""
    h, w = src.imgs.shape[2:]
    y, ey, x, ex = _pad(boxes, w, h)
    if not np.all((ey > y - 1) & (ex > x - 1)):
        raise RuntimeError("MTCNN: a candidate box lies wholly outside the image (facenet-pytorch fails here too)")
    ch, cw = (ey - y + 1).astype(np.int64), (ex - x + 1).astype(np.int64)
    crops = src.crops(inds.cpu().numpy(), (y - 1).astype(np.int64), (x - 1).astype(np.int64), ch, cw, size)
    return (crops - 127.5) * 0.0078125


# --------------------------------------------------------------------------- the cascade


def pyramid_scales(h: int, w: int, minsize: int, factor: float) -> list[float]:
    m = 12.0 / minsize
    minl, scales, scale = min(h, w) * m, [], m
    while minl >= 12:
        scales.append(scale)
        scale, minl = scale * factor, minl * factor
    return scales


def _stage1(src: Resizer, h: int, w: int, pnet: PNet, minsize: int, threshold: float, factor: float):
    """PNet over the pyramid -> (candidate boxes N,5 square; image index N)."""
    boxes, inds = [], []
    for scale in pyramid_scales(h, w, minsize, factor):
        level = (src.level(int(h * scale + 1), int(w * scale + 1)) - 127.5) * 0.0078125  # B, 3, oh, ow
        reg, probs = pnet(level)
        bs, ins = _generate_boxes(reg, probs, scale, threshold)
        pick = batched_nms(bs[:, :4], bs[:, 4], ins, 0.5).to(bs.device)
        boxes.append(bs[pick])
        inds.append(ins[pick])
    boxes, inds = torch.cat(boxes), torch.cat(inds)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7).to(boxes.device)
    boxes, inds = boxes[pick], inds[pick]
    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    qq1 = boxes[:, 0] + boxes[:, 5] * regw
    qq2 = boxes[:, 1] + boxes[:, 6] * regh
    qq3 = boxes[:, 2] + boxes[:, 7] * regw
    qq4 = boxes[:, 3] + boxes[:, 8] * regh
    return _rerec(torch.stack([qq1, qq2, qq3, qq4, boxes[:, 4]]).permute(1, 0)), inds


def _stage2(crops: torch.Tensor, boxes: torch.Tensor, inds: torch.Tensor, rnet: RNet, threshold: float):
    """RNet on the 24x24 crops -> (refined square boxes, image index)."""
    reg, score = _batched(rnet, crops)
    ok = score > threshold
    boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
    inds, reg = inds[ok], reg[ok]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7).to(boxes.device)
    return _rerec(_bbreg(boxes[pick], reg[pick])), inds[pick]


def _stage3(crops: torch.Tensor, boxes: torch.Tensor, inds: torch.Tensor, onet: ONet, threshold: float):
    """ONet on the 48x48 crops -> (final boxes N,5, landmarks N,5,2, image index N)."""
    reg, pts, score = _batched(onet, crops)
    ok = score > threshold
    pts = pts[ok].permute(1, 0)  # 10, N
    boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
    inds, reg = inds[ok], reg[ok]
    w_i = boxes[:, 2] - boxes[:, 0] + 1
    h_i = boxes[:, 3] - boxes[:, 1] + 1
    px = w_i.repeat(5, 1) * pts[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    py = h_i.repeat(5, 1) * pts[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    pts = torch.stack((px, py)).permute(2, 1, 0)  # N, 5, 2
    boxes = _bbreg(boxes, reg)
    pick = batched_nms_min(boxes[:, :4], boxes[:, 4], inds, 0.7).to(boxes.device)
    return boxes[pick], pts[pick], inds[pick]


def _batched(net: nn.Module, x: torch.Tensor, size: int = 512):
    """net over x in chunks of 512, as facenet (bounds memory; same per-chunk arithmetic)."""
    outs = [net(x[i : i + size]) for i in range(0, len(x), size)]
    return tuple(torch.cat(v) for v in zip(*outs))


def detect_faces(imgs_u8: torch.Tensor, minsize: int, nets: tuple[PNet, RNet, ONet],
                 thresholds: tuple[float, float, float], factor: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """facenet's `detect_face` on a batch of same-size RGB images.

    imgs_u8: B, H, W, 3 uint8 on the nets' device. Returns per image boxes
    (n, 5: x0, y0, x1, y1, prob; float32) and landmarks (n, 5, 2), in facenet's order.
    Needs min(H, W) >= minsize.
    """
    pnet, rnet, onet = nets
    h, w = imgs_u8.shape[1:3]
    with torch.inference_mode():
        src = Resizer(imgs_u8)
        boxes, inds = _stage1(src, h, w, pnet, minsize, thresholds[0], factor)
        pts = torch.zeros(0, 5, 2)
        if len(boxes):
            boxes, inds = _stage2(_crops(src, boxes, inds, 24), boxes, inds, rnet, thresholds[1])
            if len(boxes):
                boxes, pts, inds = _stage3(_crops(src, boxes, inds, 48), boxes, inds, onet, thresholds[2])
    boxes, pts, inds = boxes.cpu().numpy(), pts.cpu().numpy(), inds.cpu().numpy()
    out_b = [boxes[inds == i, :5].astype(np.float32).reshape(-1, 5) for i in range(len(imgs_u8))]
    out_p = [pts[inds == i].astype(np.float32).reshape(-1, 5, 2) for i in range(len(imgs_u8))]
    return out_b, out_p
