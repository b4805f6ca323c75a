"""The model-free reference bound: its transfer finds the right cell, its gain can be large, ~0 or negative."""
import numpy as np
import torch

from pipelines.refbound import heldout_gain_db, soft_transfer


def test_soft_transfer_copies_the_detail_of_the_query_itself():
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(3, 16, 16, generator=g)
    detail = torch.rand(1, 3, 128, 128, generator=g)
    out = soft_transfer(lr, lr[None], detail, k=1)  # the query is its own reference: cell (i, j) wins at (i, j)
    assert torch.allclose(out, detail[0])


def test_soft_transfer_follows_a_shift_within_the_window():
    g = torch.Generator().manual_seed(1)
    lr = torch.rand(3, 16, 16, generator=g)
    ref_lr = torch.roll(lr, shifts=1, dims=-1)  # the reference is the query moved one LR pixel right
    detail = torch.rand(1, 3, 128, 128, generator=g)
    out = soft_transfer(lr, ref_lr[None], detail, k=1)
    # interior cells come from one cell to the right in the reference
    assert torch.allclose(out[:, 8:120, 8:112], detail[0, :, 8:120, 16:120])
    out0 = soft_transfer(lr, ref_lr[None], detail, window=0, k=1)  # no window: the shift is not found
    assert not torch.allclose(out0[:, 8:120, 8:112], detail[0, :, 8:120, 16:120])


def test_heldout_gain_large_for_the_residual_zero_for_noise():
    rng = np.random.default_rng(0)
    res = rng.normal(size=(40, 3, 8, 8))
    big, a = heldout_gain_db(res, res)
    assert big > 100 and abs(a - 1) < 1e-9
    noise, _ = heldout_gain_db(res, rng.normal(size=res.shape))
    assert noise < 0.05
