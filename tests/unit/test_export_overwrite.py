"""`omni export OUT --overwrite` replaces only a previous export: never the source, a folder holding it, or any
other folder; the new export is written aside and swapped in, the old one deleted only after the swap."""

import json

import pytest

from omni.cli import main
from tests.tiny import save_tiny_omni_folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_omni_folder(tmp_path_factory.mktemp("overwrite") / "run" / "stage" / "model")


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_source_its_parents_and_foreign_folders(source, tmp_path, capsys):
    before = snapshot(source.parents[1])
    for out in (source, source.parent, source.parents[1]):  # the source itself, its stage folder, the run
        assert main(["export", str(source), str(out), "--overwrite"]) == 1
        assert "is or contains the source" in capsys.readouterr().err
    assert main(["export", str(source), str(source / "inside"), "--overwrite"]) == 1
    assert "is inside the source" in capsys.readouterr().err
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(source), str(foreign), "--overwrite"]) == 1
    assert "replaces only a previous `omni export` folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert snapshot(source.parents[1]) == before  # nothing of the run was touched


def test_overwrite_swaps_a_previous_export_for_the_new_one(source, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(source), str(out)]) == 0
    assert main(["export", str(source), str(out), "--license", "mit", "--overwrite"]) == 0
    assert "license: mit" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "omni_moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old copy left behind
    (out / "extra.txt").write_text("a file the export never writes")
    assert main(["export", str(source), str(out), "--overwrite"]) == 1  # no longer only an export: kept
    assert (out / "extra.txt").is_file()
