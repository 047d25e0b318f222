"""The `omni` command line: every subcommand's --help, and the commands that run in seconds."""

import argparse
import json
import subprocess
import sys

import pytest

from omni.cli import BENCHMARKS, main


SUBCOMMANDS = [[], ["demo"], ["data"], ["data", "synth"], ["data", "build"], ["train"], ["eval"], ["export"],
               ["chat"], ["serve"], ["bench"]]


@pytest.mark.parametrize("argv", SUBCOMMANDS)
def test_help_of_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: omni" in text and "--help" in text
    # every flag (and positional) the parser knows is explained
    for action in _parser_of(argv)._actions:
        if action.help is None and not isinstance(action, argparse._SubParsersAction):  # its choices carry help
            raise AssertionError(f"omni {' '.join(argv)}: {action.option_strings or action.dest} has no help text")


def test_every_subcommand_is_covered_by_the_help_test():
    from omni.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(argv[0] for argv in SUBCOMMANDS if len(argv) == 1)


def _parser_of(argv):
    from omni.cli import build_parser

    parser = build_parser()
    for word in argv:
        sub = next(a for a in parser._actions if getattr(a, "choices", None) and isinstance(a.choices, dict))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_lists_its_flags(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out.split("options:")[-1]


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_data_synth_then_build_from_its_manifest(tmp_path):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--num", "44", "--eval-num", "11", "--max-samples-per-shard", "20"]) == 0
    index = json.loads((out / "shards" / "train" / "index.json").read_text())
    assert index["num_samples"] == 44 and len(index["shards"]) == 3 and not index["rejected"]
    # the generic builder accepts the same manifest (and reports through JSON)
    result = subprocess.run(
        [sys.executable, "-m", "omni.cli", "data", "build", str(out / "val.jsonl"), "--media-root", str(out),
         "--out", str(tmp_path / "val_shards")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"num_samples": 11, "rejected": 0, "shards": 1}


def test_demo_runs_end_to_end(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "active per token" in text and "step 2: loss" in text and "routing audio" in text
