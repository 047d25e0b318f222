"""A model folder never runs its own code unless the user asks (`--trust-remote-code`).

The folder is a real tiny export whose config.json, tokenizer_config.json and processor_config.json name a canary
module in it through `auto_map` (as a downloaded folder could). The canary writes a marker file when it is imported.
`omni chat`, `omni eval`, `omni export` and `omni serve` load it through their real entry points and the marker never appears;
with `--trust-remote-code` (a fresh process, its own modules cache) it does, which shows the canary is reachable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni_moe.data.synth import generate
from omni.cli import build_parser, main
from omni.serve import build_server
from tests.tiny import save_tiny_omni_folder

ROOT = Path(__file__).resolve().parents[2]


def _plant_canary(folder: Path, marker: Path) -> None:
    (folder / "canary.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "class Canary:\n    pass\n", encoding="utf-8")

    def add_auto_map(name: str, entries: dict, nested: tuple[str, ...] = ()) -> None:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        data.setdefault("auto_map", {}).update(entries)
        for key in nested:
            if isinstance(data.get(key), dict):
                data[key].setdefault("auto_map", {}).update(entries)
        (folder / name).write_text(json.dumps(data), encoding="utf-8")

    everything = {"AutoConfig": "canary.Canary", "AutoModelForCausalLM": "canary.Canary",
                  "AutoProcessor": "canary.Canary", "AutoTokenizer": ["canary.Canary", "canary.Canary"],
                  "AutoImageProcessor": "canary.Canary", "AutoFeatureExtractor": "canary.Canary"}
    add_auto_map("config.json", everything)
    add_auto_map("tokenizer_config.json", everything)
    add_auto_map("processor_config.json", everything, nested=("image_processor", "feature_extractor"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_code")
    folder = save_tiny_omni_folder(root / "downloaded")
    marker = root / "canary_ran"
    _plant_canary(folder, marker)
    data = root / "synth"
    generate(data, splits={"test": 4})
    return folder, marker, data


def test_chat_eval_and_export_never_run_the_folders_code(planted, tmp_path, capsys):
    folder, marker, data = planted
    assert main(["chat", str(folder), "-p", "hi", "--max-new-tokens", "2"]) == 0
    assert not marker.exists(), "omni chat ran code from the model folder"
    assert main(["eval", str(folder), "--data", str(data), "--limit", "1", "--max-new-tokens", "2"]) == 0
    assert not marker.exists(), "omni eval ran code from the model folder"
    assert main(["export", str(folder), str(tmp_path / "out")]) == 0
    assert not marker.exists(), "omni export ran code from the model folder"
    engine, _, _ = build_server(build_parser().parse_args(["serve", str(folder), "--device", "cpu"]))
    engine.close()
    assert not marker.exists(), "omni serve ran code from the model folder"
    # the export is our own: no auto_map entry of the folder's is carried into it
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        assert "canary" not in (tmp_path / "out" / name).read_text(encoding="utf-8"), name


def test_trust_remote_code_flag_runs_the_folders_code(planted, tmp_path):
    folder, marker, _ = planted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    proc = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(folder), "-p", "hi", "--max-new-tokens", "2",
                           "--trust-remote-code"], env=env, capture_output=True, text=True, timeout=300)
    assert marker.exists(), proc.stderr[-2000:]
    marker.unlink()
    serve = ("from omni.cli import build_parser; from omni.serve import build_server; import sys; "
             "build_server(build_parser().parse_args(['serve', sys.argv[1], '--device', 'cpu', "
             "'--trust-remote-code']))[0].close()")
    proc = subprocess.run([sys.executable, "-c", serve, str(folder)], env={**env, "HF_MODULES_CACHE": str(tmp_path / "m2")},
                          capture_output=True, text=True, timeout=300)
    assert marker.exists(), "omni serve --trust-remote-code did not reach the loader: " + proc.stderr[-2000:]
    marker.unlink()
