"""User mistakes end as exit 1 and one `error:` line naming the file, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rb_helpers import invoke, make_faces, one_line_error
from refbuild.nets.vggface import DAG_CONVS, VGG16_CFG

NO_ENV_WEIGHTS = {"MSRFACE_VGGFACE_WEIGHTS": None}  # an exported path must not leak into these tests


def test_missing_source_folder(tmp_path):
    src = tmp_path / "nope"
    line = one_line_error(invoke("detect", src, "--out", tmp_path / "lib", ok=False))
    assert str(src) in line and "not found" in line


def test_empty_source_folder(tmp_path):
    src = tmp_path / "empty"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("no images here")
    line = one_line_error(invoke("detect", src, "--out", tmp_path / "lib", "--aligned", ok=False))
    assert str(src) in line and "no image files" in line


def test_library_inside_source(tmp_path):
    make_faces(tmp_path / "src", n_ids=1, per_id=2, duplicate=False)
    line = one_line_error(invoke("detect", tmp_path / "src", "--out", tmp_path / "src" / "lib", "--aligned", ok=False))
    assert "inside the source" in line


def test_labels_missing_columns(tmp_path):
    make_faces(tmp_path / "src", n_ids=2, per_id=2, duplicate=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,person\nid00/img0.png,a\n")
    line = one_line_error(invoke("detect", tmp_path / "src", "--out", tmp_path / "lib", "--aligned",
                                 "--labels", labels, ok=False))
    assert str(labels) in line and "'path'" in line and "--identity-column" in line
    labels.write_text("path,person\nid00/img0.png,a\n")
    line = one_line_error(invoke("detect", tmp_path / "src", "--out", tmp_path / "lib", "--aligned",
                                 "--labels", labels, ok=False))
    assert "'identity'" in line  # the default identity column is named


def test_labels_file_missing(tmp_path):
    make_faces(tmp_path / "src", n_ids=1, per_id=2, duplicate=False)
    labels = tmp_path / "gone.csv"
    line = one_line_error(invoke("detect", tmp_path / "src", "--out", tmp_path / "lib", "--aligned",
                                 "--labels", labels, ok=False))
    assert str(labels) in line


def test_labels_identity_and_missing_files(tmp_path):
    src = tmp_path / "src"
    make_faces(src, n_ids=2, per_id=2, duplicate=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,who\nid00/img0.png,alice\nid01/img1.png,bob\nid09/gone.png,carol\n")
    invoke("detect", src, "--out", tmp_path / "lib", "--aligned", "--labels", labels, "--identity-column", "who", "-q")
    faces = {r["src_path"]: r["identity"] for r in pq.read_table(tmp_path / "lib" / "faces.parquet").to_pylist()}
    assert faces == {"id00/img0.png": "alice", "id00/img1.png": None, "id01/img0.png": None, "id01/img1.png": "bob"}
    rej = pq.read_table(tmp_path / "lib" / "rejects.parquet").to_pylist()
    assert [(r["src_path"], r["reason"]) for r in rej] == [("id09/gone.png", "missing_file")]
    invoke("detect", src, "--out", tmp_path / "lib2", "--aligned", "--labels", labels, "--identity-column", "who",
           "--only-labeled", "-q")
    assert pq.read_table(tmp_path / "lib2" / "faces.parquet").column("src_path").to_pylist() == ["id00/img0.png", "id01/img1.png"]


def test_stage_before_detect(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for args in (["embed", lib, "--backbone", "pixels"], ["split", lib], ["pair", lib, "--manifest-dir", tmp_path]):
        line = one_line_error(invoke(*args, ok=False))
        assert str(lib / "faces.parquet") in line and "refbuild detect" in line
    line = one_line_error(invoke("audit", tmp_path / "nolib", ok=False))
    assert "nolib" in line


def test_usage_errors_exit_2(tmp_path):
    assert invoke("detect", tmp_path, "--out", tmp_path / "l", "--crop-format", "gif", ok=False).exit_code == 2
    assert invoke("split", tmp_path, "--ratios", "1,2", ok=False).exit_code == 2
    assert invoke("query", tmp_path, "select 1", "--format", "xml", ok=False).exit_code == 2


# -- embed --backbone vggface ------------------------------------------------------

@pytest.fixture(scope="module")
def small_lib(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vgg")
    make_faces(tmp / "src", n_ids=2, per_id=1, duplicate=False)
    invoke("detect", tmp / "src", "--out", tmp / "lib", "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    return tmp / "lib"


def _fake_vgg_face_dag(path: Path, drop: str | None = None) -> Path:
    """A state dict shaped like vgg_face_dag.pth (conv1_1 ... conv5_3), random values."""
    g = torch.Generator().manual_seed(0)
    chans = [v for v in VGG16_CFG if v != "M"]
    state, c_in = {}, 3
    for name, c_out in zip(DAG_CONVS, chans):
        state[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        state[f"{name}.bias"] = torch.zeros(c_out)
        c_in = c_out
    state["fc6.weight"] = torch.zeros(1)  # the real file has fc layers we ignore
    if drop:
        del state[drop]
    torch.save(state, path)
    return path


def test_vggface_without_weights(small_lib):
    line = one_line_error(invoke("embed", small_lib, "--backbone", "vggface", ok=False, env=NO_ENV_WEIGHTS))
    assert "--weights" in line and "vgg_face_dag.pth" in line


def test_vggface_missing_weights_file(small_lib, tmp_path):
    w = tmp_path / "vgg_face_dag.pth"
    line = one_line_error(invoke("embed", small_lib, "--weights", w, ok=False, env=NO_ENV_WEIGHTS))
    assert str(w) in line and "not found" in line


def test_vggface_not_a_checkpoint(small_lib, tmp_path):
    w = tmp_path / "vgg_face_dag.pth"
    w.write_text("not a checkpoint")
    line = one_line_error(invoke("embed", small_lib, "--weights", w, ok=False, env=NO_ENV_WEIGHTS))
    assert str(w) in line and "not a loadable" in line


def test_vggface_checkpoint_missing_key(small_lib, tmp_path):
    w = _fake_vgg_face_dag(tmp_path / "vgg_face_dag.pth", drop="conv3_2.weight")
    line = one_line_error(invoke("embed", small_lib, "--weights", w, ok=False, env=NO_ENV_WEIGHTS))
    assert str(w) in line and "conv3_2.weight" in line


def test_vggface_sha256_mismatch(small_lib, tmp_path):
    w = _fake_vgg_face_dag(tmp_path / "vgg_face_dag.pth")
    line = one_line_error(invoke("embed", small_lib, "--weights", w, "--weights-sha256", "0" * 64, ok=False,
                                 env=NO_ENV_WEIGHTS))
    assert str(w) in line and "sha256" in line


@pytest.mark.slow
def test_vggface_fake_weights_load_and_embed(small_lib, tmp_path):
    import hashlib

    w = _fake_vgg_face_dag(tmp_path / "vgg_face_dag.pth")
    grid = 2
    invoke("embed", small_lib, "--weights", w, "--grid", grid, "--device", "cpu", "--batch-size", 2, "-q",
           env=NO_ENV_WEIGHTS)
    t = pq.read_table(small_lib / "features.parquet")
    dim = (128 + 512 + 512) * grid * grid  # conv2_1, conv4_1, relu5_3
    assert t.schema.field("features").type.list_size == dim and t.num_rows == 2
    meta = pq.read_schema(small_lib / "features.parquet").metadata
    assert meta[b"dim"] == str(dim).encode()
    assert meta[b"weights_id"].decode() == hashlib.sha256(w.read_bytes()).hexdigest()
    assert meta[b"layers"] == b'["5:conv2_1", "17:conv4_1", "29:relu5_3"]'
    import numpy as np

    v = np.array(t.column("features").to_pylist(), np.float32)
    assert np.isfinite(v).all() and not np.allclose(v[0], v[1])
    for a, b in ((0, 512), (512, 2560), (2560, 4608)):  # l2 per layer
        assert np.allclose(np.linalg.norm(v[:, a:b], axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_embed_precision_bf16_is_recorded_and_close_to_fp32(small_lib, tmp_path):
    """--precision bf16 on CPU: features within a few % of fp32, the precision in the metadata."""
    import numpy as np

    w = _fake_vgg_face_dag(tmp_path / "vgg_face_dag.pth")
    feats = {}
    for prec in ("fp32", "bf16"):
        invoke("embed", small_lib, "--weights", w, "--precision", prec, "--device", "cpu", "--batch-size", 2, "--overwrite", "-q",
               env=NO_ENV_WEIGHTS)
        assert pq.read_schema(small_lib / "features.parquet").metadata[b"precision"] == prec.encode()
        feats[prec] = np.array(pq.read_table(small_lib / "features.parquet").column("features").to_pylist(), np.float32)
    diff = np.abs(feats["bf16"] - feats["fp32"]).max()
    assert 0 < diff < 0.05 * np.abs(feats["fp32"]).max()  # bf16 really ran, and stayed close
    res = invoke("embed", small_lib, "--weights", w, "--precision", "fp16", ok=False, env=NO_ENV_WEIGHTS)
    assert res.exit_code == 2 and "--precision is auto, fp32 or bf16" in res.output  # a usage error
