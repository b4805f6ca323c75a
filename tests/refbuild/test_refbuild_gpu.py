"""CUDA paths of the library half: batched detect with letterboxing, VGG features in bf16, FAISS GPU L1.

Skipped without CUDA (`make gpu-check` runs them where a GPU is at hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refbuild.backbones import build_backbone
from refbuild.knn import L1Index

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `make gpu-check` on a GPU machine)")]


def test_batched_letterboxed_detect_on_cuda_finds_the_cpu_boxes(real_faces):
    from refbuild.detector import Detector

    paths = sorted((real_faces / "facenet_pytorch").rglob("*.jp*g"))[:6]
    if not paths:
        pytest.skip(f"no photos under {real_faces / 'facenet_pytorch'}")
    images = [Image.open(p).convert("RGB") for p in paths]
    gpu = Detector("cuda").detect(images, batch_size=8)  # letterboxed canvases on CUDA
    cpu = Detector("cpu", letterbox=False).detect(images, batch_size=1)
    found = 0
    for p, g, c in zip(paths, gpu, cpu):
        for box in c.boxes[c.probs > 0.99]:  # every confident CPU face has a GPU box within 10% of its side
            assert len(g) and np.abs(g.boxes - box).max(1).min() < 0.1 * (box[2] - box[0]), (p, box)
            found += 1
    assert found >= 3


def test_vgg_features_bf16_on_cuda_within_2_percent_of_fp32_cpu():
    bb = build_backbone("vggface", "random", layers=(15, 22))  # random weights: a numerics test, not VGGFace
    x = torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = bb.maps(x, "fp32")
    got = bb.to(torch.device("cuda")).maps(x.cuda(), "bf16")
    for w, g in zip(want, got):
        rel = (g.cpu() - w).norm() / w.norm()
        assert rel < 0.02, float(rel)


def test_faiss_gpu_flat_l1_equals_the_cpu_kernel():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no CUDA here: pip install 'msrface[gpu]'")
    rng = np.random.default_rng(0)
    pool = rng.random((5000, 256), dtype=np.float32)
    q = rng.random((200, 256), dtype=np.float32)
    dc, ic = L1Index(pool, "cpu").search(q, 10)
    dg, ig = L1Index(pool, "cuda").search(q, 10)
    assert np.allclose(dg, dc, rtol=1e-4)
    assert (ig == ic).mean() > 0.999  # float ties may swap
