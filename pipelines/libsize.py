"""Recipe: do references count when the library holds faces the model never trained on?

The shipped model was trained on the same 3,988 faces its reference library holds, so
whatever those faces say about a new face its decoder may already have learned
(RESULTS.md section 5: over the trained model, the library's references carry no
linearly transferable detail). A deployment is different: a model is trained once and
its library grows. This recipe trains the same recipe as `pipelines.table1` on a
subset of the train manifest's identities, while every sample keeps its references
from the whole train library (the manifest's own `refbuild pair` references), then
runs `pipelines.ablate` on the test split. If references carry detail a decoder can
only get from the library, matched - none grows as the training set shrinks below the
library; if it stays at the full-data model's +0.03 dB, they do not.

    python -m pipelines.libsize --manifests LIB/manifests/NAME --identities 8,30 --steps 500 --seeds 0 --out libsize/

Writes OUT/train_<k>ids_s<seed>.parquet (the subset manifest, schema kept),
OUT/runs/<run>/ (resumable), OUT/ablate/<run>/ and OUT/libsize.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.table1 import add_recipe_args, comparison_manifests, recipe_config


def subset_manifest(src: Path, dst: Path, identities: int, seed: int) -> dict[str, int]:
    """Write the rows of `identities` identities of `src` (drawn with `seed`) to `dst`, references untouched."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from refbuild.io import write_table

    table = pq.read_table(src)
    ids = sorted({i for i in table["identity"].to_pylist() if i is not None})
    if not 0 < identities <= len(ids):
        raise SystemExit(f"{src}: --identities {identities}, but it holds {len(ids)} identities")
    keep = random.Random(seed).sample(ids, identities)
    sub = table.filter(pc.is_in(table["identity"], value_set=pc.cast(keep, table.schema.field("identity").type)))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"msrface.")}
    write_table(dst, sub, "training_manifest",
                {**meta, "subset_of": str(src.resolve()), "subset_identities": identities, "subset_seed": seed})
    return {"faces": sub.num_rows, "identities": identities, "library_faces": table.num_rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifests", type=Path, required=True, help="folder with train.parquet and test.parquet")
    ap.add_argument("--identities", required=True, help="training-set sizes in identities, e.g. 8,30")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seeds", default="0", help="training seeds (each also draws its own identities)")
    ap.add_argument("--model", default="msrnet2_x8")
    ap.add_argument("--eval-seeds", default="0,1,2", help="pipelines.ablate seeds (random/shuffled arms)")
    ap.add_argument("--out", type=Path, default=Path("libsize"))
    add_recipe_args(ap)
    a = ap.parse_args(argv)

    from model.train import train
    from pipelines import ablate
    from refbuild.io import write_bytes, write_json

    train_m, test_m = comparison_manifests(a.manifests)
    rows = []
    for k in (int(x) for x in a.identities.split(",")):
        for seed in (int(x) for x in a.seeds.split(",")):
            name = f"{a.model}_{k}ids_s{seed}"
            sub = a.out / f"train_{k}ids_s{seed}.parquet"
            sizes = subset_manifest(train_m, sub, k, seed)  # deterministic: a rerun writes the same bytes
            run = a.out / "runs" / name
            cfg = replace(recipe_config(a, sub, ckpt_every=max(1, min(100, a.steps))), model=a.model, name=name,
                          seed=seed, runs_dir=a.out / "runs", resume=(run / "last.safetensors").is_file())
            train(cfg)
            abl = a.out / "ablate" / name
            if not (abl / "ablation.json").is_file():
                ablate.main(["--checkpoint", str(run / "last.safetensors"), "--manifest", str(test_m),
                             "--out", str(abl), "--seeds", a.eval_seeds, "--device", a.device]
                            + (["--allow-enlarged"] if a.allow_enlarged else []))
            res = json.loads((abl / "ablation.json").read_text())
            rows.append({"run": name, "seed": seed, **sizes, "arms": {k2: v["mean"] for k2, v in res["arms"].items()},
                         "bicubic": res["arms"]["matched"]["bicubic"], "pairs": res["pairs"]})
    lines = [f"{a.model}, {a.steps} steps x {a.batch_size}, trained on a subset of {train_m}'s identities, references "
             f"from all of it; test {test_m} (PSNR-Y crop = scale; paired per-face 95% bootstrap CI).", "",
             "| run | train faces (ids) | library faces | bicubic | none | matched | matched - none | "
             "matched - random | oracle - none |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        ci = {k2: f"{v['mean']:+.3f} [{v['ci_lo']:+.3f}, {v['ci_hi']:+.3f}]" for k2, v in r["pairs"].items()}
        lines.append(f"| {r['run']} | {r['faces']} ({r['identities']}) | {r['library_faces']} | {r['bicubic']:.2f} "
                     f"| {r['arms']['none']:.2f} | {r['arms']['matched']:.2f} | {ci['matched - none']} "
                     f"| {ci['matched - random']} | {ci['oracle - none']} |")
    md = "\n".join(lines) + "\n"
    write_json(a.out / "libsize.json", {"config": {**vars(a), "out": str(a.out), "manifests": str(a.manifests)},
                                        "runs": rows})
    write_bytes(a.out / "libsize.md", md.encode())
    print(md)
    return {"runs": rows}


if __name__ == "__main__":
    main()
