"""Training: one frozen config, one loop (nanoGPT style); state lives outside the network."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from refbuild.io import config_dict, resolved_config, write_json
from refbuild.torchutil import resolve_precision

from . import distributed
from .checkpoint import load_checkpoint, load_weights, restore_optimizer, restore_rng, save_checkpoint
from .data import ManifestDataset, ResumableBatchSampler
from .errors import CheckpointError, MsrError
from .losses import IdentityLoss, sr_loss
from .registry import create_model
from .runlog import MetricsLogger, run_lock, sample_grid, save_png_atomic

log = logging.getLogger("model")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to `<runs_dir>/<name>/config.json`."""

    manifest: Path
    model: str = "msrnet_x8"
    name: str = "msrnet"
    runs_dir: Path = Path("runs")
    data_root: Path | None = None
    val_manifest: Path | None = None
    num_refs: int = 4
    refs: str = "matched"  # matched | random | none | oracle | shuffled
    ref_dropout: float = 0.0  # probability a sample keeps only a uniform 0..m-1 of its references
    jitter: float = 0.0  # framing jitter of HR and references (see ManifestDataset)
    degradation: str = "bicubic"  # how the LR is made: bicubic (the paper's) | real | real_mild (model.degradations)
    framing: tuple[float, float] | None = None  # HR zoom range, e.g. (0.9, 1.3): framings the test crops may have
    shift: float = 0.0  # the face moved by U(-shift, shift) of the side along each axis (framing; ManifestDataset)
    init_from: Path | None = None  # start from these weights (a shipped .safetensors or a run's), not at random
    id_loss_weight: float = 0.0  # weight of the identity loss (the frozen recogniser; model.losses.IdentityLoss)
    use_swin: bool = True
    steps: int = 10_000
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema_decay: float = 0.0  # 0 disables EMA
    stage1_weight: float = 0.0  # x16: extra L1 on I_SR^1 vs the HR downscaled to 128
    flip: bool = True
    workers: int = 0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; or fp32 / bf16
    resume: bool = False
    allow_changed_config: bool = False  # let --resume change result-affecting settings (see `settings`)
    allow_enlarged: bool = False  # accept HR targets refbuild enlarged (model.checks), with a warning
    stop_after: int | None = None  # stop (and checkpoint) at this step; the schedule still spans `steps`
    progress: bool = True

    def to_json(self) -> dict:
        return config_dict(self)

    @property
    def model_kwargs(self) -> dict:
        """What the registry builds `model` with; a checkpoint records it, a resume must match it."""
        return {} if self.use_swin else {"use_swin": False}


# where and how a run goes, not what it computes: a resume may change these freely
RUNTIME_FIELDS = frozenset({"name", "runs_dir", "workers", "log_every", "ckpt_every", "sample_every", "device",
                            "resume", "allow_changed_config", "allow_enlarged", "stop_after", "progress"})
_PATH_FIELDS = ("manifest", "data_root", "val_manifest", "init_from")


def settings(config: dict) -> dict:
    """The result-affecting settings of a `TrainConfig.to_json()` or a run's config.json (paths absolute)."""
    keep = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNTIME_FIELDS and f.name in config]
    return {k: str(Path(config[k]).resolve()) if k in _PATH_FIELDS and config[k] is not None else config[k]
            for k in keep}


def _run_settings(run_dir: Path, ck) -> dict:
    """The settings the run was made with: its config.json, else (missing or damaged) its checkpoint's; a
    setting added since the run was made (absent from its config) is the default it then ran with."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        old = ck.meta.get("config")
    if not isinstance(old, dict):
        return {}
    defaults = {f.name: json.loads(json.dumps(f.default, default=str)) for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    return settings({**defaults, **old})


def check_resume_settings(cfg: TrainConfig, run_dir: Path, ck) -> None:
    """Refuse a --resume that changes a result-affecting setting, naming each old -> new, unless allowed."""
    old, new = _run_settings(run_dir, ck), settings(json.loads(json.dumps(cfg.to_json())))
    changed = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k])
    if changed and not cfg.allow_changed_config:
        raise MsrError(f"{run_dir}: --resume with other settings than the run's ({changed}); rerun with the run's "
                       "settings, or add --allow-changed-config to continue with the new ones")
    if changed:
        log.warning("%s: resuming with changed settings: %s", run_dir, changed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from cfg.lr to cfg.lr * min_lr_ratio over cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class Ema(nn.Module):
    """Exponential moving average of a model's weights (buffers copied), with warmup: the decay at
    step t is min(decay, (1 + t) / (10 + t)) (timm's ModelEmaV3), so a short run's average is not
    mostly its random initialisation (decay 0.999 alone keeps 61% of it after 500 steps)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for e, p in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.lerp_(p, 1 - d) if e.is_floating_point() else e.copy_(p)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)


def drop_refs(mask: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """Reference dropout: with probability cfg.ref_dropout a sample keeps only its first n ~ U{0..m-1}
    references, so one model serves every m, none included. B, M bool -> B, M bool; a pure function of
    (seed, step), so a resumed run drops the same ones."""
    if cfg.ref_dropout <= 0 or mask.shape[1] == 0:
        return mask
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)
    B, M = mask.shape
    hit = torch.rand(B, generator=g) < cfg.ref_dropout
    keep = torch.randint(0, M, (B,), generator=g)
    limit = torch.where(hit, keep, torch.full_like(keep, M))  # B
    return mask & (torch.arange(M)[None, :] < limit[:, None])


class _Step(nn.Module):
    """forward_features + forward_head as one forward: DDP syncs gradients only of what runs through forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, lr: torch.Tensor, refs: torch.Tensor, mask: torch.Tensor):
        feats = self.model.forward_features(lr, refs, mask)
        return feats, self.model.forward_head(feats)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) a run; returns the run directory.

    Under `torchrun --nproc-per-node N` (RANK/WORLD_SIZE in the environment) this is
    data-parallel: `cfg.batch_size` per process, rank 0 alone writes the run folder.

    Raises:
        MsrError / ManifestError with a message saying what to fix.
    """
    info = distributed.from_env()
    device = distributed.rank_device(cfg.device, info)
    with distributed.process_group(info, device):
        return _train(cfg, info, device)


def _train(cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> Path:
    run_dir = Path(cfg.runs_dir) / cfg.name
    last = run_dir / "last.safetensors"
    if cfg.resume and not last.exists():
        raise MsrError(f"{last}: nothing to resume; drop --resume to start a new run")
    with run_lock(run_dir) if info.is_main else contextlib.nullcontext():  # rank 0 alone writes the folder
        if last.exists() and not cfg.resume:
            raise MsrError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
        return _train_locked(cfg, info, device, run_dir, last)


def _stored(score: float) -> float:
    """A score (higher is better: val PSNR-Y, or minus the mean training loss) as a checkpoint's
    `score` and `best` hold it: lower is better (minus the PSNR-Y, or the loss), as checkpoints always
    have, so old runs resume unchanged. Its own inverse: checkpoint value -> score too."""
    return -score


def _resume_position(ck) -> tuple[int, float]:
    """The checkpoint's step and best score (higher is better)."""
    step, best = ck.meta.get("step"), ck.meta.get("best")
    if type(step) is not int or step < 0 or type(best) not in (int, float):
        raise CheckpointError(f"{ck.path}: damaged checkpoint (step {step!r}, best {best!r}); resume from "
                              "another checkpoint or start a new run")
    return step, _stored(best)


def _train_locked(cfg: TrainConfig, info: distributed.DistInfo, device: torch.device, run_dir: Path,
                  last: Path) -> Path:
    precision = resolve_precision(cfg.precision, device, MsrError, cpu_bf16=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_kwargs = cfg.model_kwargs
    model = create_model(cfg.model, **model_kwargs).to(device, memory_format=torch.channels_last)  # faster convs, CPU too
    ds = ManifestDataset(cfg.manifest, model.scale, cfg.num_refs, cfg.refs, cfg.data_root, cfg.flip, cfg.seed,
                         jitter=cfg.jitter, degradation=cfg.degradation, framing=cfg.framing,
                         shift=cfg.shift)
    from .checks import check_manifest

    for path in (cfg.manifest, cfg.val_manifest):  # stale or misplaced, another scale's references, enlarged HR
        if path is not None:
            check_manifest(Path(path), model.scale, f"the model {cfg.model}", cfg.data_root, cfg.allow_enlarged)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, best = 0, -math.inf  # higher is better: val PSNR-Y, else minus the mean training loss
    if cfg.init_from is not None and not cfg.resume:
        init = load_checkpoint(cfg.init_from)
        section = "ema" if init.section("ema") else "model"
        if init.meta.get("model") != cfg.model or init.meta.get("model_kwargs", {}) != model_kwargs:
            # another variant with the very same parameters (msrnet2_x8 -> msrnet2_align_x8) may warm-start
            theirs = {k: tuple(v.shape) for k, v in init.section(section).items()}
            if theirs != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
                raise MsrError(f"{cfg.init_from}: holds {init.meta.get('model')} {init.meta.get('model_kwargs')}, "
                               f"not {cfg.model} {model_kwargs}; pass --model {init.meta.get('model')}")
            log.warning("%s: warm start from %s into %s (the same parameters, another variant)", cfg.init_from,
                        init.meta.get("model"), cfg.model)
        load_weights(model, init.section(section), str(init.path), section + ".")
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
    if cfg.resume:  # every rank loads `last`: weights, EMA and optimizer stay identical across ranks
        ck = load_checkpoint(last)
        if ck.meta.get("model") != cfg.model or ck.meta.get("model_kwargs") != model_kwargs:
            raise MsrError(f"{last}: holds {ck.meta.get('model')} {ck.meta.get('model_kwargs')}, "
                           f"not {cfg.model} {model_kwargs}")
        step, best = _resume_position(ck)
        load_weights(model, ck.section("model"), str(last), "model.")
        if ema is not None and ck.section("ema"):
            load_weights(ema.module, ck.section("ema"), str(last), "ema.")
        restore_optimizer(opt, ck)
        check_resume_settings(cfg, run_dir, ck)  # a sound checkpoint: is it this run's, as it was set?
        restore_rng(ck)
    net = distributed.wrap(_Step(model), info, device)
    val = None
    if cfg.val_manifest is not None:  # read on every rank so that a bad one fails them all alike
        val = ManifestDataset(cfg.val_manifest, model.scale, cfg.num_refs, cfg.refs, cfg.data_root,
                              degradation="bicubic" if cfg.degradation == "bicubic" else "camera")
        shared = {r.identity for r in ds.rows if r.identity} & {r.identity for r in val.rows if r.identity}
        if shared:
            raise MsrError(f"{cfg.val_manifest}: {len(shared)} identity(ies) also in {cfg.manifest}, e.g. "
                           f"{sorted(shared)[0]}; validation must be identity-disjoint (rebuild with `refbuild split`)")
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    sampler = ResumableBatchSampler(len(ds), cfg.batch_size, cfg.seed, end, step, info.rank, info.world_size)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.workers > 0)
    logger = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # absolute paths, what was used, provenance: as every stage's
        write_json(run_dir / "config.json", resolved_config(
            cfg, device=str(device), precision=precision, workers=cfg.workers, torch_threads=torch.get_num_threads(),
        ) | {"model_kwargs": model_kwargs, "scale": model.scale, "world_size": info.world_size})
        logger = MetricsLogger(run_dir, ["step", "loss", "lr", "samples_per_s", "val_psnr_y"], step)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    id_loss = IdentityLoss(device) if cfg.id_loss_weight > 0 else None

    def checkpoint(kind: str, score: float) -> None:
        meta = {"model": cfg.model, "model_kwargs": model_kwargs, "step": step, "best": _stored(best),
                "score": _stored(score), "config": cfg.to_json()}
        save_checkpoint(run_dir / f"{kind}.safetensors", model, meta, opt, ema.module if ema else None)

    def validate_and_checkpoint() -> None:  # rank 0 only
        nonlocal best
        if val is not None:
            from .evaluate import evaluate_dataset

            summary = evaluate_dataset(ema.module if ema else model, val, device, batch_size=cfg.batch_size)[1]
            score = summary["sr"]["psnr_y"]
            logger.log({"step": step, "val_psnr_y": score})
            model.train()
        else:  # no validation set: best = lowest mean training loss since the last checkpoint
            score = -(sum(losses[-cfg.ckpt_every:]) / len(losses[-cfg.ckpt_every:]))
        improved = score > best
        if improved:
            best = score
            checkpoint("best", score)
        checkpoint("last", score)
        if val is not None:  # as it goes: a run that stalls shows it at the first checkpoints, not at the end
            print(f"step {step}: val PSNR-Y {score:.2f} dB (bicubic {summary['bicubic']['psnr_y']:.2f}, "
                  f"best {best:.2f}{', new best' if improved else ''})", flush=True)

    from .progress import train_progress

    losses, t0, seen = [], time.perf_counter(), 0
    with train_progress(cfg.progress and info.is_main, total=end, done=step) as bar:
        model.train()
        for batch in loader:
            lr_now = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr_now
            lr_img, hr = batch["lr"].to(device), batch["hr"].to(device)
            refs, mask = batch["refs"].to(device), drop_refs(batch["ref_mask"], cfg, step).to(device)
            with amp:
                feats, sr = net(lr_img, refs, mask)
                loss = sr_loss(sr, hr, feats.get("sr1"), cfg.stage1_weight)
                if id_loss is not None:
                    loss = loss + cfg.id_loss_weight * id_loss(sr, hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: gradients averaged over ranks = gradient of the global-batch mean
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            seen += lr_img.shape[0] * info.world_size
            losses.append(distributed.mean_over_ranks(loss.detach(), info).item())
            rate = seen / (time.perf_counter() - t0)
            bar.update(step, loss=losses[-1], rate=rate)
            if info.is_main and (step % cfg.log_every == 0 or step == end):
                logger.log({"step": step, "loss": sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                            "lr": lr_now, "samples_per_s": rate})
            if info.is_main and (step % cfg.sample_every == 0 or step == end):
                save_png_atomic(sample_grid(lr_img, refs, sr.detach(), hr), run_dir / f"samples_{step:07d}.png")
            if step % cfg.ckpt_every == 0 or step == end:
                if info.is_main:
                    validate_and_checkpoint()
                distributed.barrier(info)  # no rank runs ahead of (or exits before) a checkpoint being written
    if logger is not None:
        logger.close()
    return run_dir
