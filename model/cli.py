"""`model` command line: train, eval, infer, list. A thin layer over typed functions."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.console import Console
from rich.table import Table

from refbuild.cliutil import Precision, choices, comma_floats, one_line_errors, run_app, version_callback

from .paste import MAX_FACE, MIN_FACE, MIN_PROB  # numpy and PIL only: --help stays fast

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MSRNet face super-resolution.",
                  rich_markup_mode=None)  # plain --help: option names are never cut, at any width
err = Console(stderr=True)
out = Console()


ALLOW_ENLARGED_HELP = ("accept HR targets refbuild enlarged (cut from fewer source pixels than the model's output "
                      "side; refused otherwise), saying how many")
RefMode = choices("RefMode", "matched", "random", "none", "oracle", "shuffled")  # model.data.REF_MODES (torch-free here)
TrainDegradation = choices("TrainDegradation", "bicubic", "real", "real_mild")  # model.degradations.TRAIN_PRESETS
EvalDegradation = choices("EvalDegradation", "bicubic", "real", "real_mild", "camera", "harsh")  # model.degradations.PRESETS
Gallery = choices("Gallery", "split", "library")  # model.identity_eval.GALLERIES


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """MSRNet face super-resolution."""


def _train_interrupted(resume: bool = False, runs_dir: Path = Path("runs"), name: str = "msrnet", **_) -> str:
    """What to do after a Ctrl-C in `model train`: its rerun needs --resume once a checkpoint exists."""
    last = Path(runs_dir) / name / "last.safetensors"
    if resume:
        return "interrupted; rerun the same command to resume"
    if last.is_file():
        return f"interrupted; rerun the same command with --resume to continue from {last}"
    return "interrupted before the first checkpoint; rerun the same command to start again"


@app.command()
@one_line_errors(err, _train_interrupted)
def train(
    manifest: Annotated[Path, typer.Option(help="training_manifest Parquet file")],
    model: Annotated[str, typer.Option(help="registered model, see `model list`")] = "msrnet_x8",
    name: Annotated[str, typer.Option(help="run name: outputs go to <runs-dir>/<name>")] = "msrnet",
    runs_dir: Annotated[Path, typer.Option(help="folder of runs")] = Path("runs"),
    data_root: Annotated[Optional[Path], typer.Option(help="replaces the manifest's hr_root and ref_root")] = None,
    val_manifest: Annotated[Optional[Path], typer.Option(help="validation manifest: picks `best` by PSNR-Y")] = None,
    num_refs: Annotated[int, typer.Option(min=0, max=5, help="references per face")] = 4,
    refs: Annotated[RefMode, typer.Option(help="matched (manifest), random (other identities), none, oracle (the HR itself) or shuffled")] = RefMode.matched,
    ref_dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help="probability a sample keeps only 0..m-1 of its references")] = 0.0,
    jitter: Annotated[float, typer.Option(min=0.0, max=0.49, help="framing jitter of HR and references (fraction of the crop side)")] = 0.0,
    degradation: Annotated[TrainDegradation, typer.Option(help="how the 16 px input is made: bicubic (the paper's, the benchmark's), real (blur, resize kernels, noise, JPEG; docs/DESIGN.md) or real_mild (the same, narrower, 30% clean: the shipped camera model's)")] = TrainDegradation.bicubic,
    framing: Annotated[Optional[str], typer.Option(help="HR zoom range LO,HI, e.g. 0.9,1.3 (>1 closer, <1 farther): train for the framings test crops may have")] = None,
    shift: Annotated[float, typer.Option(min=0.0, max=0.25, help="move the face by up to this fraction of the side along each axis (framing; edges mirrored)")] = 0.0,
    init_from: Annotated[Optional[Path], typer.Option(help="start from these weights (e.g. weights/msrnet2_x8.safetensors) instead of random ones")] = None,
    id_loss_weight: Annotated[float, typer.Option(min=0.0, help="weight of the identity loss (1 - cos of the recogniser's embeddings of SR and HR); 0 disables")] = 0.0,
    no_swin: Annotated[bool, typer.Option("--no-swin", help="3x3 conv instead of the Swin GFE (Table 3)")] = False,
    steps: Annotated[int, typer.Option(min=1)] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 2e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 0,
    grad_clip: Annotated[float, typer.Option(help="max grad norm, 0 disables")] = 1.0,
    ema_decay: Annotated[float, typer.Option(help="EMA decay, 0 disables")] = 0.0,
    stage1_weight: Annotated[float, typer.Option(help="x16: L1 weight on I_SR^1")] = 0.0,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers")] = 0,
    seed: int = 0,
    log_every: Annotated[int, typer.Option(min=1)] = 10,
    ckpt_every: Annotated[int, typer.Option(min=1)] = 500,
    sample_every: Annotated[int, typer.Option(min=1)] = 500,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    precision: Annotated[Precision, typer.Option(help="auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16")] = Precision.auto,
    resume: Annotated[bool, typer.Option("--resume", help="continue <runs-dir>/<name>/last.safetensors")] = False,
    allow_changed_config: Annotated[bool, typer.Option("--allow-changed-config", help="with --resume: accept other result-affecting settings (manifest, steps, lr, ...) than the run's")] = False,
    stop_after: Annotated[Optional[int], typer.Option(help="stop at this step (schedule still spans --steps)")] = None,
    allow_enlarged: Annotated[bool, typer.Option("--allow-enlarged", help=ALLOW_ENLARGED_HELP)] = False,
) -> None:
    """Train MSRNet on a training manifest."""
    from .distributed import from_env
    from .train import TrainConfig, train as run_train

    cfg = TrainConfig(
        manifest=manifest, model=model, name=name, runs_dir=runs_dir, data_root=data_root, val_manifest=val_manifest,
        num_refs=num_refs, refs=refs.value, ref_dropout=ref_dropout, jitter=jitter, degradation=degradation.value,
        framing=comma_floats(framing, 2, "--framing"), shift=shift, init_from=init_from, id_loss_weight=id_loss_weight, use_swin=not no_swin, steps=steps, batch_size=batch_size, lr=lr,
        warmup_steps=warmup_steps, grad_clip=grad_clip, ema_decay=ema_decay, stage1_weight=stage1_weight,
        workers=workers, seed=seed, log_every=log_every, ckpt_every=ckpt_every, sample_every=sample_every,
        device=device, precision=precision.value, resume=resume, allow_changed_config=allow_changed_config,
        stop_after=stop_after, allow_enlarged=allow_enlarged,
    )
    run_dir = run_train(cfg)
    if from_env().is_main:  # under torchrun every process returns here
        out.print(f"run written to {run_dir}")


@app.command("eval")
@one_line_errors(err, "interrupted; rerun the same command to start again")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Option(help="a run's last/best .safetensors")],
    manifest: Annotated[Path, typer.Option(help="training_manifest Parquet file to evaluate on")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="output folder")] = None,
    refs: Annotated[RefMode, typer.Option(help="matched, random, none, oracle (the HR itself) or shuffled (matched, grid permuted)")] = RefMode.matched,
    num_refs: Annotated[Optional[int], typer.Option(min=0, max=5, help="default: the run's")] = None,
    seed: Annotated[int, typer.Option(help="seed of random references and shuffles")] = 0,
    data_root: Annotated[Optional[Path], typer.Option(help="replaces the manifest's roots")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: str = "auto",
    no_ema: Annotated[bool, typer.Option("--no-ema", help="use raw weights even if EMA weights exist")] = False,
    report: Annotated[bool, typer.Option("--report", help="also write OUT/report/index.html: metrics, a gallery per face, the run's sample grids")] = False,
    degradation: Annotated[EvalDegradation, typer.Option(help="how each 16 px input is made: bicubic (the benchmark), real or real_mild (the training samplers), camera or harsh (fixed camera-like pipelines); seeded per face")] = EvalDegradation.bicubic,
    zooms: Annotated[Optional[str], typer.Option(help="also score at these centre framings, e.g. 0.9,1.15,1.3 (>1 closer)")] = None,
    shifts: Annotated[Optional[str], typer.Option(help="also score with every face moved down by these fractions of the side, e.g. 0.075 (the standard aligned CelebA test crops' framing)")] = None,
    allow_enlarged: Annotated[bool, typer.Option("--allow-enlarged", help=ALLOW_ENLARGED_HELP)] = False,
    identity: Annotated[Optional[bool], typer.Option("--identity/--no-identity", help="also score identity with dlib's face recogniser: distance to the HR, verification, rank-1, drift toward the references (default: when its weights are installed)")] = None,
    self_ensemble: Annotated[bool, typer.Option("--self-ensemble", help="average each face's output with its mirror image's (x2 compute; off: the benchmark's protocol is one pass)")] = False,
    gallery: Annotated[Gallery, typer.Option(help="identity rank-1 against the split's people, or everyone in the library (the other splits' people as distractors)")] = Gallery.split,
) -> None:
    """PSNR/SSIM (Y crop=scale and RGB) of SR and bicubic, and identity; CSV, JSON and Markdown (and an HTML report)."""
    from .evaluate import METRICS, evaluate

    where, summary = evaluate(checkpoint, manifest, out_dir, refs.value, num_refs, data_root, device,
                              batch_size, not no_ema, report, seed, degradation.value, comma_floats(zooms, None, "--zooms", (0.5, 2.0)) or (),
                              allow_enlarged, identity, comma_floats(shifts, None, "--shifts", (-0.25, 0.25)) or (),
                              self_ensemble, gallery.value)
    t = Table(title=f"{summary['n']} faces ({summary.get('split')} split), x{summary['scale']}, refs {summary['refs']} "
                    f"chosen on the {summary.get('ref_view')} view, inputs {summary['degradation']}"
                    f"{', self-ensemble x2' if summary['self_ensemble'] else ''}; bicubic MATLAB-style; *_full: MATLAB Y, no crop")
    t.add_column("method")
    for k in METRICS:
        t.add_column(k, justify="right")
    for m in ("bicubic", "sr"):
        t.add_row(m, *(f"{summary[m][k]:.4f}" for k in METRICS))
    out.print(t)
    for z, f in (summary.get("framings") or {}).items():
        out.print(f"framing {z}: SR {f['sr']['psnr_y']:.2f} dB PSNR-Y, bicubic {f['bicubic']['psnr_y']:.2f}")
    if summary.get("identity"):
        _identity_table(summary["identity"])
    elif summary.get("identity_note"):
        _note(summary["identity_note"])
    out.print(f"written to {where}", soft_wrap=True)  # soft_wrap: paths are never cut or broken
    if report:
        out.print(f"report: {where / 'report' / 'index.html'}", soft_wrap=True)


def _identity_table(s: dict) -> None:
    """The identity figures of `model eval` (summary.json["identity"]) as a table and one drift line."""
    g = s["gallery"]
    t = Table(title=f"identity (dlib recogniser, same person < {s['threshold']}); rank-1 among {g['identities']} "
                    f"identities, gallery {g['photos']} photos, {g['queries']} faces findable")
    for c in ("method", "distance", "verified", "rank-1", "nearest ref", "drifted to a ref"):
        t.add_column(c, justify="left" if c == "method" else "right")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for m in ("hr", "bicubic", "sr"):
        x = s[m]
        ref = "n/a" if x.get("ref_distance") is None else f"{x['ref_distance']:.3f}"
        t.add_row(m, f"{x['distance']:.3f}", pct(x["verified"]), pct(x["rank1"]), ref,
                  "" if m == "hr" else str(x.get("drifted", "n/a")))
    out.print(t)
    if s["sr"].get("drifted"):
        ids = [f["face_id"] for f in s["sr"]["drifted_faces"]]
        out.print(f"SR verifies as a reference rather than its own HR: {len(ids)} face(s): {', '.join(ids[:10])}"
                  + (" ..." if len(ids) > 10 else ""), soft_wrap=True)


NonSquare = choices("NonSquare", "pad", "refuse")


def _note(line: str) -> None:
    err.print(f"[yellow]note:[/yellow] {escape(line)}", markup=True, highlight=False, soft_wrap=True)


@app.command()
@one_line_errors(err, "interrupted; rerun the same command with --overwrite to start again")
def infer(
    lr: Annotated[list[str], typer.Option("--lr", "--input", "-i", help="LR face images: files, folders (recursive) or quoted globs; repeatable")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="a .safetensors checkpoint, or a run folder (its best, else last); default: weights/msrnet2_x8_real.safetensors with --detect where shipped, else weights/msrnet2_x8.safetensors")] = None,
    refs: Annotated[Optional[list[Path]], typer.Option(help="reference image(s) used for every face, 0 to 5")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder: outputs mirror the inputs' relative paths")] = Path("sr_out"),
    library: Annotated[Optional[Path], typer.Option(help="retrieve references per face from a refbuild library (LR-view matching)")] = None,
    num_refs: Annotated[int, typer.Option(min=0, max=5, help="references retrieved per face with --library")] = 4,
    weights: Annotated[Optional[str], typer.Option(envvar="MSRFACE_VGGFACE_WEIGHTS", help="the library's VGGFace weights, if it was embedded with them")] = None,
    detect: Annotated[bool, typer.Option("--detect", help="inputs are whole photos: restore their most confident face (MTCNN) and paste it back")] = False,
    all_faces: Annotated[bool, typer.Option("--all-faces", help="with --detect: restore every face found")] = False,
    margin: Annotated[float, typer.Option(min=0.0, max=2.0, help="with --detect: grow the face box by this fraction (0.52 frames faces as the shipped model's training crops)")] = 0.52,
    upscale: Annotated[Optional[int], typer.Option(min=1, max=16, help="with --detect: the restored photo's scale (default: the largest restored face at SR size, at most the model's scale)")] = None,
    min_face: Annotated[int, typer.Option(min=4, help="with --detect: the smallest face looked for, px wide (photos are enlarged for detection to find it)")] = MIN_FACE,
    min_prob: Annotated[float, typer.Option(min=0.0, max=1.0, help="with --detect: the detector's probability a face must reach")] = MIN_PROB,
    max_face: Annotated[float, typer.Option(min=0.0, help="with --detect: faces wider than this (px) are left as they were (docs/DESIGN.md: measured gains up to it)")] = MAX_FACE,
    non_square: Annotated[NonSquare, typer.Option(help="a non-square face: centre-pad it with its edge pixels, or refuse it")] = NonSquare.pad,
    grid: Annotated[bool, typer.Option("--grid", help="also write OUT/grid-NNN.png: LR | bicubic | references | SR per face")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the files an earlier run wrote in OUT")] = False,
    device: str = "auto",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="faces per forward (default: 16 on CUDA, 1 on CPU, the faster there)")] = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="use raw weights even if EMA weights exist")] = False,
    self_ensemble: Annotated[bool, typer.Option("--self-ensemble/--single-pass", help="average each face's output with its mirror image's (x2 compute; docs/DESIGN.md \"Self-ensemble\")")] = True,
) -> None:
    """Super-resolve LR faces (or the faces of whole photos) with given or retrieved references."""
    from .infer import InferConfig, infer as run_infer

    detect_only = {"--all-faces": all_faces, "--upscale": upscale, "--min-face": min_face != MIN_FACE,
                   "--min-prob": min_prob != MIN_PROB, "--max-face": max_face != MAX_FACE}
    if not detect and any(detect_only.values()):
        raise typer.BadParameter(f"{', '.join(k for k, v in detect_only.items() if v)}: need --detect")
    cfg = InferConfig(checkpoint=checkpoint, inputs=tuple(lr), out_dir=out_dir, refs=tuple(refs or ()), library=library,
                      num_refs=num_refs, weights=weights, detect=detect, all_faces=all_faces, margin=margin,
                      upscale=upscale, non_square=non_square.value, grid=grid, overwrite=overwrite, device=device,
                      batch_size=batch_size, use_ema=not no_ema, min_face=min_face, min_prob=min_prob, max_face=max_face,
                      self_ensemble=self_ensemble)
    rec = run_infer(cfg, _note)
    faces = [f for i in rec["inputs"] for f in i.get("faces", []) if f.get("output")]
    skipped = sum(i["status"] == "skipped" for i in rec["inputs"])
    how = ", self-ensemble" if rec["self_ensemble"] else ", one pass"
    out.print(f"{len(faces)} SR face(s) x{rec['scale']} ({rec['model']}{how}, {rec['checkpoint']}) written under {out_dir} "
              f"({rec['faces_per_s']:.1f} faces/s)" + (f"; {skipped} input(s) skipped" if skipped and not detect else ""),
              soft_wrap=True)
    if detect:
        from .infer import summary_line

        out.print(summary_line(rec), soft_wrap=True)
    restored = [i["restored"] for i in rec["inputs"] if i.get("restored")]
    if restored:
        out.print(f"restored photo(s): {restored[0]}" + (f" and {len(restored) - 1} more" if len(restored) > 1 else ""),
                  soft_wrap=True)
    for g in rec["grids"]:
        out.print(f"grid: {g}", soft_wrap=True)
    out.print(f"record: {out_dir / 'infer.json'}", soft_wrap=True)


@app.command()
@one_line_errors(err, "interrupted; rerun the same command")
def export(
    checkpoint: Annotated[Path, typer.Option(help="a run's last/best .safetensors")],
    out_path: Annotated[Path, typer.Option("--out", help="weights file to write")],
    no_ema: Annotated[bool, typer.Option("--no-ema", help="export the raw weights even if EMA weights exist")] = False,
    blend_with: Annotated[Optional[Path], typer.Option(help="average with this checkpoint of the same network (e.g. the one a fine-tune started from)")] = None,
    blend: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="with --blend-with: its weight; the result is (1 - blend) x CHECKPOINT + blend x BLEND_WITH")] = None,
) -> None:
    """Weights-only copy of a checkpoint (no optimizer state): for sharing, as weights/ does."""
    from .checkpoint import export_weights

    if (blend is None) != (blend_with is None):
        raise typer.BadParameter("--blend and --blend-with go together: give both (e.g. --blend-with CLEAN --blend 0.1)")
    meta = export_weights(checkpoint, out_path, not no_ema, blend_with, blend or 0.0)
    mix = f", blended {1 - blend:g} : {blend:g} with {blend_with}" if blend_with else ""
    out.print(f"{meta['model']} step {meta.get('step')} ({meta['weights']} weights{mix}) written to {out_path}")


@app.command("list")
@one_line_errors(err, "interrupted")
def list_cmd() -> None:
    """Registered model variants."""
    from .registry import list_models

    for n in list_models():
        out.print(n)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every fallback at INFO
    run_app(app, "model")


if __name__ == "__main__":
    main()
