"""Training: outputs, exact resume, and a short run on real faces."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from model.evaluate import evaluate
from model.train import TrainConfig, train
from refbuild.io import TMP_PREFIX


def _cfg(manifest, runs, **kw) -> TrainConfig:
    base = dict(manifest=manifest, model="msrnet_tiny_x4", runs_dir=runs, steps=6, batch_size=2, num_refs=2,
                log_every=1, ckpt_every=2, sample_every=3, ema_decay=0.9, progress=False, flip=True)
    return TrainConfig(**{**base, **kw})


def test_run_outputs(synthetic_manifest, tmp_path, caplog):
    run = train(_cfg(synthetic_manifest, tmp_path, name="a", steps=3, num_refs=1))
    for f in ("config.json", "metrics.csv", "last.safetensors", "best.safetensors", "samples_0000003.png"):
        assert (run / f).is_file(), f
    assert json.loads((run / "config.json").read_text())["model"] == "msrnet_tiny_x4"
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard" in caplog.text  # not installed: a warning, never silence
    else:
        assert list((run / "tb").glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert not list(run.glob(TMP_PREFIX + "*"))


def test_resume_is_exact(synthetic_manifest, tmp_path):
    straight = train(_cfg(synthetic_manifest, tmp_path, name="straight", steps=4, num_refs=1))
    cfg = _cfg(synthetic_manifest, tmp_path, name="split", steps=4, num_refs=1, stop_after=2)
    train(cfg)
    resumed = train(replace(cfg, stop_after=None, resume=True))
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    params = [k for k in a if k.startswith(("model.", "ema.", "optim."))]
    assert params and all(torch.equal(a[k], b[k]) for k in params), [k for k in params if not torch.equal(a[k], b[k])]


def test_bf16_on_cpu_trains_close_to_fp32_and_bad_precision_is_refused(synthetic_manifest, tmp_path):
    from model.errors import MsrError

    runs = {p: train(_cfg(synthetic_manifest, tmp_path, name=p, steps=2, num_refs=1, ema_decay=0.0, precision=p))
            for p in ("fp32", "bf16")}
    assert json.loads((runs["bf16"] / "config.json").read_text())["precision"] == "bf16"
    loss = {p: [float(r.split(",")[1]) for r in (run / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[1]]
            for p, run in runs.items()}
    assert loss["fp32"] != loss["bf16"]  # autocast really ran
    assert abs(loss["fp32"][0] - loss["bf16"][0]) <= 0.05 * loss["fp32"][0]
    with pytest.raises(MsrError, match="--precision 'fp16'"):
        train(_cfg(synthetic_manifest, tmp_path, name="bad", precision="fp16"))


@pytest.mark.slow
@pytest.mark.realdata
def test_short_training_on_real_faces_beats_bicubic(real_manifest, tmp_path):
    cfg = _cfg(real_manifest, tmp_path, name="real", steps=60, batch_size=4, num_refs=2, lr=2e-3, ema_decay=0.0,
               log_every=10, ckpt_every=60, sample_every=60, flip=False, warmup_steps=5)
    run = train(cfg)
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows if r.split(",")[1]]
    assert losses[-1] < 0.97 * losses[0], losses  # starts near bicubic (small tails)
    _, summary = evaluate(run / "last.safetensors", real_manifest, tmp_path / "eval")
    assert summary["sr"]["psnr_y"] > summary["bicubic"]["psnr_y"], summary
    assert (tmp_path / "eval" / "per_image.csv").is_file() and (tmp_path / "eval" / "summary.md").is_file()
