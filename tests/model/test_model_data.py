"""Manifest dataset: degradation, flips, reference modes, roots, resumable order."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from model import MsrError
from model.data import ManifestDataset, ResumableBatchSampler


def test_sample_layout_and_degradation(synthetic_manifest):
    ds = ManifestDataset(synthetic_manifest, scale=8, num_refs=5)
    s = ds[0]
    assert s["lr"].shape == (3, 16, 16) and s["hr"].shape == (3, 128, 128)
    assert s["refs"].shape == (5, 3, 128, 128)
    assert s["ref_mask"].tolist() == [True] * 4 + [False]  # the manifest has 4 refs: the 5th is padding
    assert s["refs"][4].abs().sum() == 0
    assert 0 <= s["lr"].min() and s["hr"].max() <= 1


def test_flip_is_shared_by_hr_lr_and_refs(synthetic_manifest):
    plain = ManifestDataset(synthetic_manifest, scale=4, num_refs=2)
    flip = ManifestDataset(synthetic_manifest, scale=4, num_refs=2, flip=True)
    n_flipped = 0
    for key in range(16):
        a, b = plain[key], flip[key]
        if not torch.equal(a["hr"], b["hr"]):
            n_flipped += 1
            for k in ("hr", "lr", "refs"):
                torch.testing.assert_close(b[k], a[k].flip(-1))
    assert 0 < n_flipped < 16


def test_ref_modes(synthetic_manifest):
    assert ManifestDataset(synthetic_manifest, 4, 3, refs="none")[0]["ref_mask"].sum() == 0
    rnd = ManifestDataset(synthetic_manifest, 4, 3, refs="random", seed=1)
    assert rnd[0]["ref_mask"].all()
    assert not torch.equal(rnd[0]["refs"], ManifestDataset(synthetic_manifest, 4, 3)[0]["refs"])


def test_data_root_override_and_missing_roots(synthetic_manifest, tmp_path):
    t = pq.read_table(synthetic_manifest)
    pq.write_table(t.replace_schema_metadata({k: v for k, v in t.schema.metadata.items() if b"root" not in k}),
                   tmp_path / "m.parquet")
    with pytest.raises(MsrError, match="pass --data-root"):
        ManifestDataset(tmp_path / "m.parquet", 4)
    assert len(ManifestDataset(tmp_path / "m.parquet", 4, data_root=synthetic_manifest.parent)) == 8


def test_batch_sampler_resumes_mid_epoch():
    full = list(ResumableBatchSampler(10, 3, seed=0, total_steps=7))
    assert full[4:] == list(ResumableBatchSampler(10, 3, seed=0, total_steps=7, start_step=4))
    assert sorted(k % 10 for b in full[:3] for k in b) == sorted(set(k % 10 for b in full[:3] for k in b))
    with pytest.raises(MsrError, match="batch size"):
        ResumableBatchSampler(2, 3, 0, 1)


def test_batch_sampler_rank_slices_tile_the_global_batch():
    """N ranks with batch b take contiguous slices of what one process with batch N*b takes, also after a resume."""
    one = list(ResumableBatchSampler(10, 4, seed=1, total_steps=7))
    ranks = [list(ResumableBatchSampler(10, 2, seed=1, total_steps=7, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert list(ResumableBatchSampler(10, 2, 1, 7, start_step=3, rank=1, world_size=2)) == ranks[1][3:]
    with pytest.raises(MsrError, match=r"2 processes x 3"):
        ResumableBatchSampler(5, 3, 0, 1, rank=0, world_size=2)


def test_oracle_shuffled_and_jitter_modes(synthetic_manifest):
    matched = ManifestDataset(synthetic_manifest, 4, 2)[0]
    oracle = ManifestDataset(synthetic_manifest, 4, 2, refs="oracle")[0]
    assert oracle["ref_mask"].all()
    for r in oracle["refs"]:
        torch.testing.assert_close(r, oracle["hr"])
    shuf = ManifestDataset(synthetic_manifest, 4, 2, refs="shuffled", seed=3)[0]
    assert shuf["ref_mask"].all() and not torch.equal(shuf["refs"], matched["refs"])
    # the same pixels, other places: the blocks are permuted, not altered
    torch.testing.assert_close(shuf["refs"].flatten(1).sort(dim=1).values, matched["refs"].flatten(1).sort(dim=1).values)
    jit = ManifestDataset(synthetic_manifest, 4, 2, jitter=0.3, seed=1)[0]
    assert jit["hr"].shape == matched["hr"].shape and not torch.equal(jit["hr"], matched["hr"])
    with pytest.raises(Exception, match="jitter"):
        ManifestDataset(synthetic_manifest, 4, 2, jitter=0.7)


def test_reference_dropout_is_seeded_and_keeps_a_prefix():
    from model.train import TrainConfig, drop_refs

    cfg = TrainConfig(manifest="x", ref_dropout=0.5, seed=1)
    mask = torch.ones(64, 4, dtype=torch.bool)
    a, b = drop_refs(mask, cfg, 3), drop_refs(mask, cfg, 3)
    assert torch.equal(a, b) and not torch.equal(a, drop_refs(mask, cfg, 4))
    n = a.sum(1)
    assert (n == 4).any() and (n == 0).any() and (n < 4).float().mean().item() == pytest.approx(0.5, abs=0.2)
    assert torch.equal(a, torch.arange(4)[None] < n[:, None])  # the first n references are kept
    assert torch.equal(drop_refs(mask, TrainConfig(manifest="x"), 3), mask)
