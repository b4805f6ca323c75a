"""Self-ensemble (x2 flip): the mirrored pass is mirrored back, with mirrored references, and averaged."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from model.cli import app
from model.ensemble import super_resolve


class _Lopsided(nn.Module):
    """Not mirror-equivariant: the upsampled LR plus a left-to-right ramp, plus the references the mask keeps."""

    def forward(self, lr, refs, mask):
        up = F.interpolate(lr, size=refs.shape[-1], mode="nearest")  # B, 3, H, W
        ramp = torch.linspace(0, 1, refs.shape[-1]).expand_as(up)
        return up + ramp + (refs * mask[:, :, None, None, None]).sum(1)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, False], [True, False]])  # the second slot is absent
    return torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 2, 3, 8, 8, generator=g), mask


def test_one_pass_is_the_model_itself():
    lr, refs, mask = _inputs()
    m = _Lopsided()
    assert torch.equal(super_resolve(m, lr, refs, mask), m(lr, refs, mask))


def test_the_mirrored_pass_comes_back_the_right_way_round_with_mirrored_references():
    lr, refs, mask = _inputs()
    se = super_resolve(_Lopsided(), lr, refs, mask, self_ensemble=True)
    up = F.interpolate(lr, size=8, mode="nearest")
    # the image and the references keep their orientation (a flip not undone, or references not
    # flipped with the LR, would mirror them), the mask its slots; the lopsided ramp averages to its mean, 0.5
    assert torch.allclose(se, up + 0.5 + refs[:, 0], atol=1e-6)


def test_eval_and_infer_record_it_infer_by_default(synthetic_manifest, tmp_path):
    from model.checkpoint import save_checkpoint
    from model.registry import create_model

    ck = tmp_path / "m.safetensors"
    save_checkpoint(ck, create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    runner = CliRunner()
    outs = {}
    r = runner.invoke(app, ["eval", "--checkpoint", str(ck), "--manifest", str(synthetic_manifest), "--no-identity",
                            "--gallery", "library"])
    assert r.exit_code == 1 and "--gallery library is a gallery for identity" in r.output, r.output
    for flag in ([], ["--self-ensemble"]):
        out = tmp_path / f"eval{len(flag)}"
        r = runner.invoke(app, ["eval", "--checkpoint", str(ck), "--manifest", str(synthetic_manifest), "--out", str(out),
                                "--no-identity", *flag])
        assert r.exit_code == 0, r.output
        outs[bool(flag)] = json.loads((out / "summary.json").read_text())
    assert outs[False]["self_ensemble"] is False and outs[True]["self_ensemble"] is True
    assert outs[False]["sr"]["psnr_y"] != outs[True]["sr"]["psnr_y"]  # an untrained net is not mirror-symmetric
    assert outs[False]["bicubic"] == outs[True]["bicubic"]
    from PIL import Image

    face = tmp_path / "face.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(face)
    for flag, expected in (([], True), (["--single-pass"], False)):
        out = tmp_path / f"infer{len(flag)}"
        r = runner.invoke(app, ["infer", "-i", str(face), "--checkpoint", str(ck), "--out", str(out), *flag])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "infer.json").read_text())["self_ensemble"] is expected
        assert ("self-ensemble" if expected else "one pass") in r.output  # said, not only recorded
    one, two = (np.asarray(Image.open(next((tmp_path / d).rglob("*_x4.png")))) for d in ("infer1", "infer0"))
    assert not np.array_equal(one, two)  # the flag reaches the model: an untrained net is not mirror-symmetric
