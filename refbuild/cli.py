"""`refbuild`: the command-line face of the reference-library pipeline.

Thin: each command parses options into its stage's frozen config and calls the
stage's `run`. Library code raises RefbuildError; only this module turns it
into a one-line red message and exit code 1.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from refbuild.backbones import BACKBONES, backbones_help
from refbuild.cliutil import Precision, choices, comma_floats, one_line_errors, version_callback
from refbuild.errors import RefbuildError
from refbuild.progress import console
from refbuild.runners import Engine as EngineName

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain --help: option names are never cut, at any width
                  help="Build a reference library for MSRNet: detect -> embed -> split -> pair, then query and audit.")

Lib = Annotated[Path, typer.Argument(help="Library folder (written by `refbuild detect --out`).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary tables.")]
Overwrite = Annotated[bool, typer.Option(
    help="Start again from scratch (needed only to abandon an unfinished run that used other settings).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Workers = Annotated[int, typer.Option(
    help="Worker processes (local engine) or actors (ray engine); 0: one per CPU core (one on GPU). "
         "Outputs do not depend on it.")]
Engine = Annotated[EngineName, typer.Option(
    help="local (processes on this machine) or ray (Ray Data; pip install 'msrface[ray]').")]


# Choices: typer checks them and shows them in --help; each command passes `.value` on, so the
# stages' frozen configs (and their fingerprints) hold the same plain strings as before.
BackboneName = choices("BackboneName", *BACKBONES)  # the registry's names
CropFormat = choices("CropFormat", "png", "jpg")
LayerNorm = choices("LayerNorm", "l2", "none")
Unlabeled = choices("Unlabeled", "singleton", "exclude")
QueryView = choices("QueryView", "hr", "lr")
RefPool = choices("RefPool", "train", "all")
IndexKind = choices("IndexKind", "exact", "ivf")
OutputFormat = choices("OutputFormat", "table", "csv", "json")


def _precision(value: str | Precision) -> Precision:
    """--precision keeps its own wording for a bad value (`--precision is auto, fp32 or bf16`)."""
    try:
        return Precision(value)
    except ValueError:
        raise typer.BadParameter("--precision is auto, fp32 or bf16") from None




def _check_engine(engine: EngineName, workers: int) -> None:
    if workers < 0:
        raise typer.BadParameter("--workers must be 0 (auto) or more")


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Build a reference library for MSRNet: detect -> embed -> split -> pair, then query and audit."""


command = one_line_errors(console)  # under every @app.command(): errors in one line, handled once
reading = one_line_errors(console, "interrupted (nothing was written)")  # the same, for the commands that only read


@app.command()
@command
def detect(
    src: Annotated[Path, typer.Argument(help="Folder of photos (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Library folder to write.")],
    labels: Annotated[Optional[Path], typer.Option(
        help="CSV with a `path` column (relative to SRC) and an identity column.")] = None,
    identity_column: Annotated[str, typer.Option(help="Identity column of --labels.")] = "identity",
    identity_from_folder: Annotated[bool, typer.Option(
        "--identity-from-folder", help="Identity = the image's parent folder.")] = False,
    only_labeled: Annotated[bool, typer.Option(help="Process only images listed in --labels.")] = False,
    aligned: Annotated[bool, typer.Option(
        help="Images are already-aligned faces (CelebA-HQ, FFHQ): no detection.")] = False,
    all_faces: Annotated[bool, typer.Option(help="Keep every face, not only the most confident one.")] = False,
    margin: Annotated[float, typer.Option(
        help="Border added around the squared box, as a fraction of its side. 0: the box itself, the paper's "
             "framing; 0.52 frames faces as the shipped model's aligned training crops (what `model infer "
             "--detect` uses), so a library for that model takes --margin 0.52.")] = 0.0,
    crop_size: Annotated[int, typer.Option(help="Side of the saved crops (paper: 256).")] = 256,
    crop_format: Annotated[CropFormat, typer.Option(help="png (lossless) or jpg.")] = CropFormat.png,
    min_face: Annotated[int, typer.Option(help="Reject faces whose box is shorter than this (source pixels).")] = 40,
    min_prob: Annotated[float, typer.Option(help="Ignore faces below this MTCNN probability.")] = 0.95,
    detect_size: Annotated[int, typer.Option(help="Long side images are shrunk to for detection.")] = 1024,
    max_pixels: Annotated[int, typer.Option(help="Reject larger images (decompression-bomb guard).")] = 64_000_000,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images, sorted by path.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per MTCNN batch.")] = 8,
    shard_size: Annotated[int, typer.Option(help="Images per resumable shard.")] = 128,
    device: Device = "auto",
    workers: Workers = 0,
    engine: Engine = EngineName.local,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Find faces with MTCNN, save square crops, write faces.parquet and rejects.parquet."""
    from refbuild.detect import DetectConfig, run

    _check_engine(engine, workers)
    if labels is not None and identity_from_folder:
        raise typer.BadParameter("use --labels or --identity-from-folder, not both")
    cfg = DetectConfig(
        src=src, out=out, labels=labels, identity_column=identity_column,
        identity_from="csv" if labels else ("folder" if identity_from_folder else "none"),
        only_labeled=only_labeled, aligned=aligned, all_faces=all_faces, margin=margin, crop_size=crop_size,
        crop_format=crop_format.value, min_face=min_face, min_prob=min_prob, detect_size=detect_size,
        max_pixels=max_pixels,
        limit=limit, batch_size=batch_size, shard_size=shard_size, device=device, workers=workers, engine=engine.value,
        overwrite=overwrite, quiet=quiet)
    run(cfg)


@app.command()
@command
def embed(
    lib: Lib,
    backbone: Annotated[BackboneName, typer.Option(help=backbones_help())] = BackboneName("vggface"),
    weights: Annotated[Optional[str], typer.Option(
        envvar="MSRFACE_VGGFACE_WEIGHTS",
        help="vgg_face_dag.pth, or 'random' (tests only, says so in every output).")] = None,
    weights_sha256: Annotated[Optional[str], typer.Option(help="Refuse weights whose sha256 differs.")] = None,
    layers: Annotated[str, typer.Option(help="VGG-16 feature indices (paper: 5,17,29).")] = "5,17,29",
    grid: Annotated[Optional[int], typer.Option(
        help="Pool each layer to grid x grid (default: vggface 2, hog 8, pixels 16).")] = None,
    layer_norm: Annotated[LayerNorm, typer.Option(
        help="l2 (each layer's vector to unit length) or none.")] = LayerNorm.l2,
    views: Annotated[str, typer.Option(
        help="hr, lr or hr,lr. lr = the crop degraded by --lr-scale and back (for pair --query-view lr).")] = "hr",
    lr_scale: Annotated[int, typer.Option(help="Degradation factor of the lr view.")] = 8,
    batch_size: Annotated[int, typer.Option()] = 32,
    shard_size: Annotated[int, typer.Option(help="Faces per resumable shard.")] = 1024,
    device: Device = "auto",
    precision: Annotated[Precision, typer.Option(
        parser=_precision, help="auto (bf16 on CUDA, fp32 on CPU), fp32, or bf16 (~2x on CPUs with AVX512-BF16/AMX; "
                                "features within ~1%).")] = Precision.auto,
    workers: Workers = 0,
    engine: Engine = EngineName.local,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Multi-layer VGGFace features of every crop into features.parquet."""
    from refbuild.embed import EmbedConfig, run

    _check_engine(engine, workers)
    layer_t = tuple(int(x) for x in comma_floats(layers, None, "--layers"))
    run(EmbedConfig(lib=lib, backbone=backbone.value, weights=weights, weights_sha256=weights_sha256, layers=layer_t,
                    grid=grid, layer_norm=layer_norm.value, views=tuple(v.strip() for v in views.split(",")),
                    lr_scale=lr_scale, batch_size=batch_size, shard_size=shard_size, device=device,
                    precision=precision.value,
                    workers=workers, engine=engine.value, overwrite=overwrite, quiet=quiet))


@app.command()
@command
def split(
    lib: Lib,
    ratios: Annotated[str, typer.Option(help="train,val,test shares (paper: 14,3,1).")] = "14,3,1",
    counts: Annotated[Optional[str], typer.Option(
        help="train,val,test face counts instead of ratios; the rest is 'unused'.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    unlabeled: Annotated[Unlabeled, typer.Option(
        help="Faces without identity: singleton (each photo its own identity) or exclude.")] = Unlabeled.singleton,
    allow_empty: Annotated[bool, typer.Option(
        "--allow-empty", help="Let a split with a non-zero share end with no face (else an error).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a split made with other settings (its manifests go stale: rerun pair).")] = False,
    quiet: Quiet = False,
) -> None:
    """Identity-disjoint train/val/test split into splits.parquet."""
    from refbuild.split import SplitConfig, run

    cnt = comma_floats(counts, 3, "--counts")
    run(SplitConfig(lib=lib, ratios=comma_floats(ratios, 3, "--ratios"), counts=tuple(int(c) for c in cnt) if cnt else None,
                    seed=seed, unlabeled=unlabeled.value, allow_empty=allow_empty, overwrite=overwrite, quiet=quiet))


@app.command()
@command
def pair(
    lib: Lib,
    m: Annotated[int, typer.Option("-m", help="References per query (paper: 4 best, 5 stored).")] = 4,
    queries: Annotated[Optional[Path], typer.Option(
        help="Pair the faces of this other library against LIB: a separate output, MANIFEST_DIR/<name>/ with its own "
             "pairs.parquet and pair.config.json; LIB's own pairing stays.")] = None,
    query_view: Annotated[QueryView, typer.Option(
        help="hr (paper) or lr (match on the query's own degraded view).")] = QueryView.hr,
    pool: Annotated[Optional[RefPool], typer.Option(
        help="train (leak-free, default) or all (the paper's whole library).")] = None,
    layer_weights: Annotated[Optional[str], typer.Option(help="One weight per layer for Eq. 2, e.g. 1,1,1.")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Manifest name (default: the library folder's name; with --queries, the query library's; with "
             "--same-person, <library>_same_person).")] = None,
    same_person: Annotated[bool, typer.Option(
        "--same-person", help="EXPERIMENT (a positive control, never for deployment): references are the nearest "
                              "other photos of the query's OWN identity, from its own split (test queries: test "
                              "photos); named so in the manifests and their metadata. Takes no --pool.")] = False,
    manifest_dir: Annotated[Optional[Path], typer.Option(
        help="Where <name>/{train,val,test}.parquet go (default: LIB/manifests).")] = None,
    pool_chunk: Annotated[int, typer.Option(
        help="Search the pool this many rows at a time and merge (0: one index); bounds memory.")] = 0,
    index: Annotated[IndexKind, typer.Option(
        help="exact (default) or ivf: approximate FAISS IVF-Flat L1 on CPU for very large pools; its recall@m against "
             "exact search is measured and reported.")] = IndexKind.exact,
    nlist: Annotated[int, typer.Option(help="--index ivf: inverted lists (0: about 4 sqrt(pool)).")] = 0,
    nprobe: Annotated[int, typer.Option(
        help="--index ivf: lists visited per query (more: slower, higher recall).")] = 16,
    query_chunk: Annotated[int, typer.Option(
        help="Queries per task (a resumable shard, one Ray task with --engine ray).")] = 2048,
    device: Device = "auto",
    workers: Annotated[int, typer.Option(
        help="--engine ray: actors, each holding the pool (0: one). The local engine searches in this process, on "
             "every core.")] = 0,
    engine: Engine = EngineName.local,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Top-m non-identity references by summed per-layer L1 (exact search by default), and training manifests
    (--same-person, an experiment: other photos of the query's own identity instead)."""
    from refbuild.pair import PairConfig, run

    _check_engine(engine, workers)
    if same_person and pool is not None:
        raise typer.BadParameter("--same-person draws references from the query's own split (its identity lives in "
                                 "no other); drop --pool", param_hint="--pool")
    run(PairConfig(lib=lib, m=m, queries=queries, query_view=query_view.value,
                   pool=(pool or RefPool.train).value, same_person=same_person,
                   layer_weights=comma_floats(layer_weights, None, "--layer-weights"), name=name,
                   manifest_dir=manifest_dir, pool_chunk=pool_chunk, index=index.value, nlist=nlist, nprobe=nprobe,
                   query_chunk=query_chunk, device=device, workers=workers, engine=engine.value,
                   overwrite=overwrite, quiet=quiet))


@app.command()
@reading
def query(
    lib: Lib,
    sql: Annotated[str, typer.Argument(
        help="One SELECT over the views faces, rejects, features, features_lr, splits, pairs.")],
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv or json.")] = OutputFormat.table,
    max_rows: Annotated[int, typer.Option(help="Rows shown by --format table.")] = 50,
    timeout: Annotated[float, typer.Option(
        help="Stop a query still running after this many seconds (0: no limit).")] = 60.0,
) -> None:
    """Read-only DuckDB SQL over the library's Parquet files."""
    from refbuild.db import open_query
    from refbuild.library import Library

    if max_rows < 0 or timeout < 0:
        raise typer.BadParameter("--max-rows and --timeout are 0 or more (--timeout 0: no limit)")
    with open_query(Library(lib), sql, timeout) as (cols, fetch):
        if format is OutputFormat.csv:  # streamed: every row, never all of them in memory
            w = csv.writer(sys.stdout)
            w.writerow(cols)
            while rows := fetch(10_000):
                w.writerows(rows)
        elif format is OutputFormat.json:  # streamed, the same bytes as one json.dumps of the list
            sep = "["
            while rows := fetch(10_000):
                for r in rows:
                    sys.stdout.write(sep + json.dumps(dict(zip(cols, r)), default=str))
                    sep = ", "
            sys.stdout.write(("[" if sep == "[" else "") + "]\n")
        else:
            rows = fetch(max_rows + 1)
            _print_table(cols, rows[:max_rows], len(rows) > max_rows)


def _print_table(cols: list[str], rows: list[tuple], cut: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = (f"showing first {len(rows)} rows; add LIMIT/OFFSET (or --max-rows) for others" if cut
               else f"{len(rows)} rows")
    t = Table(*(escape(c) for c in cols), caption=caption)
    for r in rows:
        t.add_row(*(_cell(v) for v in r))
    Console().print(t)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return escape(s if len(s) <= 60 else s[:57] + "...")


@app.command()
@reading
def audit(
    lib: Lib,
    hashes: Annotated[bool, typer.Option(help="Re-hash source images against faces.src_sha256.")] = True,
    manifest: Annotated[Optional[list[Path]], typer.Option(
        help="Manifests to check (default: those `pair` wrote).")] = None,
    quiet: Quiet = False,
) -> None:
    """Check every invariant; list violations and exit 1 when there are any."""
    from rich.table import Table

    from refbuild.audit import AuditConfig, run

    if not lib.is_dir():
        raise RefbuildError(f"{lib}: library folder not found")
    checks = run(AuditConfig(lib=lib, hashes=hashes, manifests=tuple(manifest) if manifest else None))
    bad = [c for c in checks if c.violations]
    if not quiet:
        console.print(escape(f"refbuild audit {lib}"), style="italic", highlight=False, soft_wrap=True)  # a path: never cut
        t = Table("check", "checked", "violations")
        for c in checks:
            t.add_row(escape(c.name), f"{c.checked:,}",
                      f"[red]{len(c.violations)}[/]" if c.violations else "[green]0[/]")
        console.print(t)
    for c in bad:
        for v in c.violations[:10]:
            console.print(f"[red]violation[/] {escape(c.name)}: {escape(v)}", highlight=False, soft_wrap=True)
        if len(c.violations) > 10:
            console.print(f"  ... and {len(c.violations) - 10} more", highlight=False)
    if bad:
        console.print(f"[bold red]audit failed:[/] {sum(len(c.violations) for c in bad)} violations "
                      f"in {len(bad)} checks")
        raise typer.Exit(1)
    console.print(f"[green]audit passed:[/] {len(checks)} checks")


@app.command()
@command
def report(
    lib: Lib,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Report folder to write (index.html, thumbs/); movable, opens offline.")],
    thumb_size: Annotated[int, typer.Option(help="Longest side of the JPEG thumbnails.")] = 96,
    quality: Annotated[int, typer.Option(help="JPEG quality of the thumbnails (1-95).")] = 85,
    page_size: Annotated[int, typer.Option(help="Cards per gallery page.")] = 50,
    workers: Annotated[int, typer.Option(help="Threads making thumbnails.")] = 8,
    quiet: Quiet = False,
) -> None:
    """One static HTML page: summary, histograms, query/reference and rejects galleries."""
    from refbuild.report import ReportConfig, run

    run(ReportConfig(lib=lib, out=out, thumb_size=thumb_size, quality=quality, page_size=page_size,
                     workers=workers, quiet=quiet))


def main() -> None:
    from refbuild.cliutil import run_app

    os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "TRUE")  # faiss and torch both ship OpenMP
    run_app(app, "refbuild")
