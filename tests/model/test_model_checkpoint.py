"""Checkpoints: round trip, truncation, foreign architecture."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, create_model
from model.checkpoint import load_checkpoint, model_from_checkpoint, restore_optimizer, save_checkpoint
from refbuild.io import TMP_PREFIX


def _save(path, name="msrnet_tiny_x4"):
    torch.manual_seed(0)
    model = create_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 16, 16), torch.rand(1, 1, 3, 64, 64)).mean().backward()
    opt.step()
    save_checkpoint(path, model, {"model": name, "model_kwargs": {}, "step": 1, "best": 0.0}, opt)
    return model, opt


def test_round_trip(tmp_path):
    model, opt = _save(tmp_path / "c.safetensors")
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))  # the atomic writer's temp files
    ck = load_checkpoint(tmp_path / "c.safetensors")
    again = model_from_checkpoint(ck)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.Adam(again.parameters(), lr=1e-3)
    restore_optimizer(opt2, ck)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    _save(tmp_path / "c.safetensors")
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "t.safetensors")


def test_foreign_safetensors_and_other_architecture(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="not an msrface checkpoint"):
        load_checkpoint(tmp_path / "f.safetensors")
    _save(tmp_path / "c.safetensors", "msrnet_tiny_x4")
    ck = load_checkpoint(tmp_path / "c.safetensors")
    ck.meta["model"] = "msrnet_tiny_x16"  # weights of x4 under the name of x16
    with pytest.raises(CheckpointError, match="other architecture"):
        model_from_checkpoint(ck)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_export_blend_is_the_weighted_mean_of_two_checkpoints_of_one_network(tmp_path):
    from model.checkpoint import export_weights

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(paths[-1], create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    meta = export_weights(paths[0], tmp_path / "b.safetensors", blend_with=paths[1], blend=0.25)
    a, b = (model_from_checkpoint(load_checkpoint(p)).state_dict() for p in paths)
    got = model_from_checkpoint(load_checkpoint(tmp_path / "b.safetensors")).state_dict()
    floats = [k for k in got if got[k].is_floating_point()]
    assert floats and not torch.equal(a[floats[0]], b[floats[0]])
    for k in floats:
        torch.testing.assert_close(got[k], 0.75 * a[k] + 0.25 * b[k])
    assert meta["blended"]["weight"] == 0.25 and len(meta["blended"]["sha256"]) == 64
    save_checkpoint(tmp_path / "x8.safetensors", create_model("msrnet2_tiny_x8"), {"model": "msrnet2_tiny_x8", "model_kwargs": {}})
    with pytest.raises(CheckpointError, match="same network"):
        export_weights(paths[0], tmp_path / "c.safetensors", blend_with=tmp_path / "x8.safetensors", blend=0.5)
    with pytest.raises(CheckpointError, match="between 0 and 1"):
        export_weights(paths[0], tmp_path / "c.safetensors", blend_with=paths[1], blend=1.0)


def test_export_blend_on_the_command_line_and_its_usage_error(tmp_path):
    from typer.testing import CliRunner

    from model.cli import app

    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"m{seed}.safetensors", create_model("msrnet2_tiny_x4"),
                        {"model": "msrnet2_tiny_x4", "model_kwargs": {}, "score": -1.0})
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "m0.safetensors"), "--out", str(tmp_path / "b.safetensors"),
                            "--blend-with", str(tmp_path / "m1.safetensors"), "--blend", "0.5"])
    assert r.exit_code == 0 and "blended 0.5 : 0.5" in r.output, r.output
    meta = load_checkpoint(tmp_path / "b.safetensors").meta
    assert meta["blended"]["weight"] == 0.5 and "score" not in meta  # the run's score was of the weights before
    r = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "m0.safetensors"), "--out", str(tmp_path / "c.safetensors"),
                            "--blend", "0.5"])
    assert r.exit_code == 2 and "go together" in r.output and not (tmp_path / "c.safetensors").exists()
