"""Recipe: how much can references tell that the model does not already know? (a model-free bound)

For every face of a manifest it builds, without any learning, a detail image from the
references: for each 8x8 HR cell (at x8; scale x scale in general) of the query, the
3x3 LR patch around it is compared with the references' LR patches (the reference
degraded the same way) in a (2w+1)^2 window at the same place, and the HR detail
(reference HR minus the bicubic upsampling of its LR) of the k best candidates is
averaged with softmax(-d / T) weights: TTSR-style soft transfer in its plainest form.

The detail image is then added, with one scalar gain fitted on half the faces (2-fold
cross-fitting), to a base: the bicubic upsampling, and the checkpoint's own output
without references. The held-out MSE drop, in dB, is what a linear use of the
transferred detail is worth over that base. If it is ~0 over the model's output for
matched references, those references carry no detail the model has not already
learned; comparing matched with random references tells whether retrieval picks
anything useful at all. With `--pool TRAIN_MANIFEST` a third arm, `nearest_hr`,
takes the m pool faces nearest to the *true* HR (L1 at 32x32): the best lookalikes
the library holds, a retrieval no descriptor of the LR can beat. The `oracle` arm
(the HR itself) is the control that must show a gain; `same_identity` takes other
photos of the query's own identity from the same manifest (a gallery of the person).

    python -m pipelines.refbound --checkpoint weights/msrnet2_x8.safetensors \\
        --manifest LIB/manifests/NAME/test.parquet --out refbound.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def soft_transfer(lr: torch.Tensor, ref_lr: torch.Tensor, ref_detail: torch.Tensor, window: int = 2, k: int = 4,
                  temperature: float = 0.02) -> torch.Tensor:
    """Local soft top-k transfer of reference detail, no learning.

    lr: 3, h, w query LR; ref_lr: M, 3, h, w references degraded like the query;
    ref_detail: M, 3, h*s, w*s (reference HR minus bicubic of its LR). Returns 3, h*s, w*s.
    """
    M, _, h, w = ref_lr.shape
    s = ref_detail.shape[-1] // w
    q = F.unfold(F.pad(lr[None], (1, 1, 1, 1), mode="replicate"), 3).reshape(27, h, w)  # 27, h, w
    r = F.unfold(F.pad(ref_lr, (1, 1, 1, 1), mode="replicate"), 3).reshape(M, 27, h, w)  # M, 27, h, w
    cells = F.unfold(ref_detail, s, stride=s).reshape(M, 3 * s * s, h, w)  # M, 3ss, h, w
    p = window
    r = F.pad(r, (p, p, p, p), value=float("inf"))  # out-of-image candidates never win
    cells = F.pad(cells, (p, p, p, p))
    dist, vals = [], []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            cand = r[:, :, dy:dy + h, dx:dx + w]  # M, 27, h, w
            dist.append(((cand - q[None]) ** 2).mean(1))  # M, h, w
            vals.append(cells[:, :, dy:dy + h, dx:dx + w])
    dist = torch.cat(dist).nan_to_num(float("inf"))  # M*(2p+1)^2, h, w
    vals = torch.cat(vals)  # M*(2p+1)^2, 3ss, h, w
    top = dist.topk(min(k, dist.shape[0]), dim=0, largest=False)  # k, h, w
    wgt = torch.softmax(-top.values / temperature, dim=0)  # k, h, w
    picked = torch.gather(vals, 0, top.indices[:, None].expand(-1, vals.shape[1], -1, -1))  # k, 3ss, h, w
    out = (wgt[:, None] * picked).sum(0)  # 3ss, h, w
    return F.fold(out.reshape(1, 3 * s * s, h * w), (h * s, w * s), s, stride=s)[0]


def heldout_gain_db(residual: np.ndarray, detail: np.ndarray) -> tuple[float, float]:
    """2-fold cross-fitted gain of residual - a * detail over residual (dB of MSE), and the mean fitted a.

    residual, detail: N, ... arrays (target minus base; transferred detail)."""
    n = len(residual)
    halves = (np.arange(n) < n // 2, np.arange(n) >= n // 2)
    before = after = 0.0
    gains = []
    for fit, test in (halves, halves[::-1]):
        a = float((residual[fit] * detail[fit]).sum() / max((detail[fit] ** 2).sum(), 1e-12))
        gains.append(a)
        before += float((residual[test] ** 2).sum())
        after += float(((residual[test] - a * detail[test]) ** 2).sum())
    return 10 * np.log10(before / max(after, 1e-300)), float(np.mean(gains))


def hr_thumb(im, size: int = 32) -> np.ndarray:
    """The nearest-HR descriptor: an HR image (PIL) at size x size, bicubic, flattened, in [0, 1]."""
    from PIL import Image

    return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32).ravel() / 255


def nearest_hr_refs(manifest: Path, pool: Path, num_refs: int, size: int = 32) -> list[list[Path]]:
    """Per row of `manifest`: the `num_refs` HR crops of `pool` nearest its own HR (L1 at size x size), other identities."""
    from model.data import ManifestDataset, load_rgb

    def thumb(p: Path) -> np.ndarray:
        return hr_thumb(load_rgb(p), size)

    q, lib = ManifestDataset(manifest, 8, refs="none"), ManifestDataset(pool, 8, refs="none")
    feats = np.stack([thumb(r.hr) for r in lib.rows])
    out = []
    for row in q.rows:
        d = np.abs(feats - thumb(row.hr)).sum(1)
        d[[i for i, r in enumerate(lib.rows) if r.identity is not None and r.identity == row.identity]] = np.inf
        out.append([lib.rows[i].hr for i in np.argsort(d)[:num_refs]])
    return out


def library_size_refs(manifest: Path, pool: Path, num_refs: int, sizes: list[int], seed: int = 0,
                      scale: int = 8) -> dict[str, list[list[Path]]]:
    """References from random libraries of each size in `sizes` (nested: one permutation of `pool`, its first k).

    Two arms per size k: `lr_matched@k`, the `pixels` descriptor of the LR view (16x16 mean-removed, L1; what
    `refbuild pair --query-view lr` does), and `nearest_hr@k`, the k-library's faces nearest the true HR (L1 at
    32x32). Other identities only."""
    from model.data import ManifestDataset, degrade, load_rgb

    def descriptors(p: Path) -> tuple[np.ndarray, np.ndarray]:
        im = load_rgb(p)
        lr = np.asarray(degrade(im, scale)[1], dtype=np.float32) / 255
        return (lr - lr.mean()).ravel(), hr_thumb(im)

    q, lib = ManifestDataset(manifest, scale, refs="none"), ManifestDataset(pool, scale, refs="none")
    if max(sizes) > len(lib.rows):
        raise SystemExit(f"{pool}: --pool-sizes up to {max(sizes)}, but the pool holds {len(lib.rows)} faces")
    lib_lr, lib_hr = map(np.stack, zip(*(descriptors(r.hr) for r in lib.rows)))
    lib_ids = np.array([r.identity if r.identity is not None else f"\0{i}" for i, r in enumerate(lib.rows)])
    order = np.random.default_rng(seed).permutation(len(lib.rows))
    out: dict[str, list[list[Path]]] = {f"{arm}@{k}": [] for k in sizes for arm in ("lr_matched", "nearest_hr")}
    for row in q.rows:
        d_lr, d_hr = descriptors(row.hr)
        for k in sizes:
            sub = order[:k][lib_ids[order[:k]] != row.identity]
            for arm, feats, d in (("lr_matched", lib_lr, d_lr), ("nearest_hr", lib_hr, d_hr)):
                near = sub[np.argsort(np.abs(feats[sub] - d).sum(1), kind="stable")[:num_refs]]
                out[f"{arm}@{k}"].append([lib.rows[i].hr for i in near])
    return out


def same_identity_refs(manifest: Path, num_refs: int) -> list[list[Path]]:
    """Per row: up to `num_refs` other photos of the same identity in the manifest (none for a singleton)."""
    from model.data import ManifestDataset

    rows = ManifestDataset(manifest, 8, refs="none").rows
    return [[o.hr for o in rows if o.identity is not None and o.identity == r.identity and o.hr != r.hr][:num_refs]
            for r in rows]


def collect(checkpoint: Path, manifest: Path, arms: tuple[str, ...], num_refs: int, seed: int,
            pool: Path | None = None, extra: dict[str, list[list[Path]]] | None = None) -> dict:
    """Per arm, the transferred detail of every face (N, 3, H, W), and the residuals of the two bases.

    `extra`: more arms, each its references per manifest row (e.g. `library_size_refs`)."""
    from model.checkpoint import load_checkpoint, model_from_checkpoint
    from PIL import Image

    from model.data import ManifestDataset, degrade, to_tensor
    from model.metrics import bicubic_upsample, tensor_to_uint8

    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    scale = model.scale

    def bic(x: torch.Tensor, size: int) -> torch.Tensor:  # B, 3, h, w -> B, 3, size, size (MATLAB-style)
        return torch.stack([torch.from_numpy(bicubic_upsample(tensor_to_uint8(i), size)).permute(2, 0, 1)
                            for i in x]).float() / 255.0

    out: dict = {"scale": scale}
    for arm in arms:
        own = {"nearest_hr": lambda: nearest_hr_refs(manifest, pool, num_refs),
               "same_identity": lambda: same_identity_refs(manifest, num_refs),
               **{k: (lambda v=v: v) for k, v in (extra or {}).items()}}
        ds = ManifestDataset(manifest, scale, num_refs=num_refs, refs="matched" if arm in own else arm, seed=seed)
        if arm in own:  # the manifest's rows with other references
            ds.rows = [dataclasses.replace(r, refs=tuple(p)) for r, p in zip(ds.rows, own[arm]())]
        res_b, res_m, det = [], [], []
        for i in range(len(ds)):
            s = ds[i]
            lr, hr, refs = s["lr"], s["hr"], s["refs"][s["ref_mask"]]
            size = hr.shape[-1]
            if arm == arms[0]:
                with torch.no_grad():
                    sr = model(lr[None], torch.zeros(1, 0, 3, size, size), torch.zeros(1, 0, dtype=torch.bool))[0]
                res_b.append((hr - bic(lr[None], size)[0]).numpy())
                res_m.append((hr - sr.float().clamp(0, 1)).numpy())
            ref_lr = torch.stack([to_tensor(degrade(Image.fromarray(tensor_to_uint8(r)), scale)[1]) for r in refs])
            det.append(soft_transfer(lr, ref_lr, refs - bic(ref_lr, size)).numpy() if len(refs)
                       else np.zeros(hr.shape, np.float32))  # no reference: no detail
        if res_b:
            out["residual"] = {"bicubic": np.stack(res_b), "model": np.stack(res_m)}
        out[arm] = np.stack(det)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--num-refs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=Path, default=None,
                    help="the train manifest: adds the nearest_hr arm (the pool faces nearest the true HR)")
    ap.add_argument("--pool-sizes", default="",
                    help="with --pool: also random libraries of these sizes (e.g. 250,500,1000,2000), each with "
                         "LR-matched and nearest-HR references (arms lr_matched@K, nearest_hr@K)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    arms = ("matched", "random", "oracle", "same_identity") + (("nearest_hr",) if a.pool else ())  # oracle: control
    extra = None
    if a.pool_sizes:
        if not a.pool:
            raise SystemExit("--pool-sizes needs --pool (the library the sizes are drawn from)")
        from model.checkpoint import load_checkpoint, model_from_checkpoint

        scale = model_from_checkpoint(load_checkpoint(a.checkpoint)).scale
        extra = library_size_refs(a.manifest, a.pool, a.num_refs, [int(k) for k in a.pool_sizes.split(",")],
                                  a.seed, scale)
        arms += tuple(extra)
    data = collect(a.checkpoint, a.manifest, arms, a.num_refs, a.seed, a.pool, extra)
    result = {"checkpoint": str(a.checkpoint.resolve()), "manifest": str(a.manifest.resolve()),
              "pool": str(a.pool.resolve()) if a.pool else None,
              "n": int(len(data[arms[0]])), "num_refs": a.num_refs, "seed": a.seed, "gain_db": {}}
    for base, res in data["residual"].items():
        for arm in arms:
            g, alpha = heldout_gain_db(res, data[arm])
            result["gain_db"][f"{arm}_over_{base}"] = round(g, 4)
            result["gain_db"][f"{arm}_over_{base}_alpha"] = round(alpha, 4)
            print(f"{arm:8s} references over {base:8s}: {g:+.3f} dB held-out (fitted gain {alpha:+.3f})")
    if a.out:
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
