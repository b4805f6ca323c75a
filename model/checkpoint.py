"""Checkpoints: one safetensors file, written atomically, never unpickled.

Layout of `<run>/last.safetensors` and `<run>/best.safetensors`:
  tensors   `model.<name>`, `ema.<name>`, `optim.<param index>.<state key>`,
            `rng.torch` (and `rng.cuda` on CUDA)
  metadata  `msrface.checkpoint` = JSON {format, model, model_kwargs, step, config,
            optim_param_groups, optim_scalars, python_rng, best, ...}
Write goes through refbuild.io's atomic writer: a temp file beside the target
(`.tmp-<file>.*`), fsynced, then `os.replace`d into place, so a crash leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refbuild.io import _atomic_path, sha256_file

from .errors import CheckpointError, MsrError
from .registry import create_model

FORMAT = "msrface.msrnet.v1"
META_KEY = "msrface.checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: its JSON state and its tensors (by prefix)."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
) -> None:
    """Atomically write model (+ EMA, optimizer, RNG) tensors and JSON `meta`.

    `meta` must hold at least `model` (registry name) and `model_kwargs`.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    meta = {"format": FORMAT, **meta}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{pid}.{key}"] = val
                else:
                    scalars.setdefault(str(pid), {})[key] = val
        meta["optim_param_groups"] = sd["param_groups"]
        meta["optim_scalars"] = scalars
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta["python_rng"] = random.getstate()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_path(path) as tmp:  # makes the folder; fsyncs the temp file before the rename
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})


def resolve_checkpoint(path: Path) -> Path:
    """A run folder stands for its `best.safetensors`, else its `last.safetensors`."""
    if not path.is_dir():
        return path
    for name in ("best.safetensors", "last.safetensors"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: a folder without best.safetensors or last.safetensors; give a run folder or a .safetensors file")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (a run folder: its best, else its last).

    Raises:
        CheckpointError: missing, truncated/corrupt, or not an msrface checkpoint.
    """
    path = resolve_checkpoint(Path(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; give a `last.safetensors` or `best.safetensors` of a run")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({e}); use another checkpoint") from e
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file but not an msrface checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint ('{META_KEY}' metadata is not a JSON object); use another checkpoint")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this msrface reads {FORMAT!r}")
    return Checkpoint(path, meta, tensors)


def check_tensors(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """Where `like` (the model's own state) holds floating point, `state` must too, and be finite:
    an int8 or NaN tensor would otherwise load silently (load_state_dict casts). `prefix`: the
    tensors' section in the file, for the message."""
    for k, v in state.items():
        ref = like.get(k)
        if ref is None or not ref.is_floating_point():
            continue
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: tensor {prefix}{k} is {v.dtype}, not floating point; the checkpoint is damaged, use another one")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{where}: tensor {prefix}{k} holds NaN or infinite values; the checkpoint is damaged "
                                  "(or its run diverged), use another one")


def _filtered(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    from .msrnet import checkpoint_filter_fn  # model-agnostic: strips DataParallel / compile prefixes

    return checkpoint_filter_fn(state, model)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """Strict load; a foreign architecture, a non-floating or non-finite weight become a CheckpointError."""
    state = _filtered(state, model)
    check_tensors(state, model.state_dict(), where, prefix)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{where}: weights do not fit {type(model).__name__} ({first}); other architecture?") from e


def _ints(x: Any) -> list[int]:
    if isinstance(x, (list, tuple)):
        return [i for v in x for i in _ints(v)]
    return [x] if isinstance(x, int) else []


def _check_shapes(ckpt: Checkpoint, name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Build the model on the meta device (no memory) and match its shapes with the stored tensors,
    so that forged `model_kwargs` never allocate before a tensor is checked."""
    def unfit(why: str) -> CheckpointError:
        return CheckpointError(f"{ckpt.path}: model kwargs {kwargs} do not fit {name!r} ({why}); "
                               "the checkpoint is damaged or of another architecture, use another one")

    size = sum(v.numel() for v in state.values())
    if any(abs(i) > size for i in _ints(list(kwargs.values()))):  # a width or depth above the weight count
        raise unfit(f"a value above the {size} stored weights")
    try:
        with torch.device("meta"):
            skeleton = create_model(name, **kwargs)
    except MsrError:  # an unknown name: the message lists the choices
        raise
    except Exception as e:  # whatever the constructor makes of forged kwargs
        raise unfit(_why(e)) from e
    like = skeleton.state_dict()
    for k, v in _filtered(state, skeleton).items():
        if k in like and like[k].shape != v.shape:
            raise unfit(f"{k} is {tuple(v.shape)} in the file, {tuple(like[k].shape)} in the model")


def model_from_checkpoint(ckpt: Checkpoint, use_ema: bool = True) -> nn.Module:
    """Rebuild the registered model the checkpoint describes and load its weights (EMA if present)."""
    name, kwargs = ckpt.meta.get("model"), ckpt.meta.get("model_kwargs", {})
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{ckpt.path}: damaged checkpoint (metadata 'model' {name!r}, 'model_kwargs' {kwargs!r}); "
                              "use another checkpoint")
    section = "ema" if use_ema and ckpt.section("ema") else "model"
    state = ckpt.section(section)
    _check_shapes(ckpt, name, kwargs, state)
    model = create_model(name, **kwargs)
    load_weights(model, state, str(ckpt.path), section + ".")
    return model


def export_weights(src: str | Path, dst: str | Path, use_ema: bool = True, blend_with: str | Path | None = None,
                   blend: float = 0.0) -> dict[str, Any]:
    """Write a weights-only checkpoint (EMA weights if present and `use_ema`, no optimizer or EMA copy):
    what `weights/` ships. Loads with `model eval/infer --checkpoint` like any run checkpoint.

    blend_with, blend: write (1 - blend) x these weights + blend x `blend_with`'s (the same network,
    e.g. the model a fine-tune started from: WiSE-FT, Wortsman et al. 2022; DESIGN.md "Realistic
    inputs"). Recorded in the metadata with the other file's sha256."""
    ck = load_checkpoint(src)
    model = model_from_checkpoint(ck, use_ema)
    keep = ("model", "model_kwargs", "step", "score", "config")
    meta = {k: ck.meta[k] for k in keep if k in ck.meta} | {"exported_from": str(src),
                                                             "weights": "ema" if use_ema and ck.section("ema") else "raw"}
    if blend_with is not None:
        if not 0.0 < blend < 1.0:
            raise CheckpointError(f"--blend {blend:g}: give a weight strictly between 0 and 1 for {blend_with} "
                                  "(0 or 1 would be one of the two files alone)")
        other_ck = load_checkpoint(blend_with)
        mine = (ck.meta["model"], ck.meta.get("model_kwargs", {}))
        theirs = (other_ck.meta.get("model"), other_ck.meta.get("model_kwargs", {}))
        if theirs != mine:
            raise CheckpointError(f"{blend_with}: {theirs[0]} {theirs[1]} cannot be blended into {src}'s {mine[0]} "
                                  f"{mine[1]}; blend two checkpoints of the same network")
        other = model_from_checkpoint(other_ck, use_ema).state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():  # floating tensors averaged; integer buffers kept
                if v.is_floating_point():
                    v.copy_((1 - blend) * v.float() + blend * other[k].float())
        meta["blended"] = {"with": str(blend_with), "sha256": sha256_file(other_ck.path), "weight": blend,
                           "weights": "ema" if use_ema and other_ck.section("ema") else "raw"}
        meta.pop("score", None)  # the run's validation score was of the weights before the blend
    save_checkpoint(dst, model, meta)
    return meta


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _damaged(ckpt: Checkpoint, what: str, why: str) -> CheckpointError:
    return CheckpointError(f"{ckpt.path}: damaged {what} ({why}); resume from another checkpoint or start a new run")


def _optim_state(ckpt: Checkpoint) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    state: dict[int, dict[str, Any]] = {}
    for k, v in ckpt.section("optim").items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    for pid, sc in ckpt.meta.get("optim_scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    groups = ckpt.meta["optim_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return state, groups


def _check_optim_tensors(ckpt: Checkpoint, state: dict[int, dict[str, Any]], params: list[torch.Tensor]) -> None:
    """torch checks neither shapes nor values of optimizer state: a bad one would fail (or go NaN) mid-training."""
    for pid, st in state.items():
        if not 0 <= pid < len(params):
            raise _damaged(ckpt, "optimizer state", f"parameter {pid} of {len(params)}")
        for key, v in st.items():
            if not torch.is_tensor(v):
                continue
            if v.dim() > 0 and v.shape != params[pid].shape:
                raise _damaged(ckpt, "optimizer state", f"optim.{pid}.{key} is {tuple(v.shape)}, "
                                                        f"its parameter {tuple(params[pid].shape)}")
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise _damaged(ckpt, "optimizer state", f"optim.{pid}.{key} is not finite floating point")


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the optimizer state saved by `save_checkpoint`; a damaged one is a CheckpointError."""
    try:
        state, groups = _optim_state(ckpt)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(ckpt, "optimizer state", _why(e)) from e
    _check_optim_tensors(ckpt, state, [p for g in optimizer.param_groups for p in g["params"]])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not fit this model ({e})") from e


def restore_rng(ckpt: Checkpoint) -> None:
    """Restore the RNG states saved by `save_checkpoint`; a damaged one is a CheckpointError."""
    try:
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        if "rng.cuda" in ckpt.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.tensors["rng.cuda"])
        st = ckpt.meta["python_rng"]
        random.setstate((st[0], tuple(st[1]), st[2]))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise _damaged(ckpt, "RNG state", _why(e)) from e
