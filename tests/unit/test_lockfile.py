"""launch/requirements.lock, the tested set of versions, against pyproject.toml (launch/lockfile.py).

launch/install.sh installs with the lock as pip constraints and then runs `lockfile.py check` on the venv, so CI
fails if the environment it tests is not the locked one; this file checks that the lock itself is well formed and
honours every range pyproject.toml declares, and that the checker catches what it should.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK = REPO_ROOT / "launch" / "requirements.lock"


def _load_lockfile():
    spec = importlib.util.spec_from_file_location("lockfile", REPO_ROOT / "launch" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockfile = _load_lockfile()


def test_the_lock_pins_every_pyproject_dependency_inside_its_range():
    pins = lockfile.read_lock(LOCK)
    assert lockfile.disagreements(pins) == []
    # the whole resolved environment, not just the direct dependencies: transitive ones are pinned too
    assert {"transformers", "torch", "huggingface-hub", "tokenizers", "numpy", "packaging"} <= set(pins)
    assert len(pins) > 2 * len(lockfile.project_requirements())
    assert not {"pip", "setuptools", "wheel", "omni-moe"} & set(pins)


def test_the_installers_torch_is_the_locked_torch():
    default = re.search(r"TORCH_SPEC:-torch==([^}]+)}", (REPO_ROOT / "launch" / "install.sh").read_text()).group(1)
    assert lockfile.read_lock(LOCK)["torch"] == default


def test_disagreements_name_the_package_and_the_reason(tmp_path):
    pins = lockfile.read_lock(LOCK)
    outside = dict(pins, transformers="4.57.0")
    assert lockfile.disagreements(outside) == [
        "transformers: the lock pins 4.57.0, outside pyproject.toml's '<6,>=5.24'"]
    missing = {k: v for k, v in pins.items() if k != "webdataset"}
    assert [p.split(":")[0] for p in lockfile.disagreements(missing)] == ["webdataset"]


@pytest.mark.parametrize("line, message", [
    ("transformers>=5.24", "expected 'name==version'"),
    ("torch==2.13.0\ntorch==2.13.0", "torch is pinned twice"),
])
def test_a_malformed_lock_is_an_error_naming_the_line(tmp_path, line, message):
    bad = tmp_path / "bad.lock"
    bad.write_text("# comment\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.lock:2: {message}|bad.lock:3: {message}"):
        lockfile.read_lock(bad)


def test_the_installed_check_compares_versions_and_tolerates_platform_only_entries(tmp_path, capsys):
    have = lockfile.installed()
    exact = tmp_path / "exact.lock"
    exact.write_text("".join(f"{name}=={version}\n" for name, version in have.items()) + "not-on-this-python==1.0\n")
    assert lockfile.main(["check", str(exact)]) == 0
    assert "locked but not installed here: not-on-this-python" in capsys.readouterr().out
    wrong = tmp_path / "wrong.lock"
    wrong.write_text(f"pytest==0.0.1\nnumpy=={have['numpy']}\n")
    assert lockfile.main(["check", str(wrong)]) == 1
    assert f"pytest is {have['pytest']}, the lock says 0.0.1" in capsys.readouterr().err
    assert lockfile.main(["diff", str(wrong)]) == 0
    assert f"pytest: 0.0.1 -> {have['pytest']}" in capsys.readouterr().out
