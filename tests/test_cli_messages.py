"""Messages both command lines share: --version, usage errors in one line, errors that point the right way."""
from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_manifests import ManifestError, read_table
from model.cli import app as model_app
from refbuild.cli import app as refbuild_app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("app", [model_app, refbuild_app])
def test_version(app):
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("msrface "), r.output


@pytest.mark.slow
@pytest.mark.parametrize("args, where", [
    (["model", "train", "--num-refs", "9", "--manifest", "x.parquet"], "model train --help"),
    (["refbuild", "split", ".", "--ratios", "1,2"], "refbuild split --help"),
    (["model", "nosuch"], "model --help"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, where):
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], r.stderr


def test_a_file_as_detect_source_is_called_a_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    r = CliRunner().invoke(refbuild_app, ["detect", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "lib")])
    assert r.exit_code == 1 and "a file, not a folder" in r.output and "not found" not in r.output, r.output


def test_missing_detect_output_names_the_real_syntax(tmp_path):
    from refbuild.errors import RefbuildError
    from refbuild.library import Library

    with pytest.raises(RefbuildError, match=r"run `refbuild detect PHOTOS/ --out .*` first"):
        Library(tmp_path).require(tmp_path / "faces.parquet", "detect")


def test_a_csv_as_manifest_is_not_told_to_delete_it(tmp_path):
    (tmp_path / "m.csv").write_text("face_id,hr_path\na,b.png\n")
    with pytest.raises(ManifestError) as e:
        read_table(tmp_path / "m.csv", "training_manifest")
    assert "not a Parquet file" in str(e.value) and "delete" not in str(e.value) and "\n" not in str(e.value)


def test_bad_weights_never_advise_weights_only_false(tmp_path):
    from refbuild.nets.vggface import load_vggface_state
    from refbuild.errors import RefbuildError

    bad = tmp_path / "w.pth"
    bad.write_bytes(pickle.dumps({"conv1_1.weight": object()}))
    with pytest.raises(RefbuildError) as e:
        load_vggface_state(bad)
    msg = str(e.value)
    assert "weights_only" not in msg and "\n" not in msg and "--backbone pixels" in msg, msg


def test_embed_without_vggface_weights_names_the_offline_backbone(monkeypatch):
    from refbuild.backbones import PAPER_LAYERS, build_backbone
    from refbuild.errors import RefbuildError

    monkeypatch.delenv("MSRFACE_VGGFACE_WEIGHTS", raising=False)
    with pytest.raises(RefbuildError, match="--backbone pixels"):
        build_backbone("vggface", None, None, tuple(PAPER_LAYERS))


@pytest.mark.parametrize("app, prog", [(model_app, "model"), (refbuild_app, "refbuild")])
def test_help_at_80_columns_shows_every_option_name_whole(app, prog):
    """`--identity-colu…` no more: each command's --help names every option in full on an 80-column terminal."""
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert r.exit_code == 0, r.output
        assert max(len(line) for line in r.output.splitlines()) <= 80, f"{prog} {name} --help:\n{r.output}"
        words = set(re.findall(r"--?[\w-]+", r.output))
        missing = [o for p in cmd.params for o in p.opts + p.secondary_opts if o.startswith("-") and o not in words]
        assert not missing, f"{prog} {name} --help at 80 columns cuts {missing}:\n{r.output}"
