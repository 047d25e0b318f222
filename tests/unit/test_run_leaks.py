"""Small leaks of a run: the one-process group listens on no public interface, and OUTPUT/recipe.yaml goes
through the secret scrubber the other outputs use."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LISTENING = """
import os, torch.distributed as dist
from omni_moe.training.distributed import init_distributed
init_distributed(deepspeed_comm=False)
inodes = {os.readlink(f"/proc/self/fd/{fd}")[8:-1] for fd in os.listdir("/proc/self/fd")
          if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")}
for table in ("tcp", "tcp6"):
    for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, one of this process's sockets
            print(table, fields[1].split(":")[0])
dist.destroy_process_group()
"""
LOOPBACK = {"tcp": {"0100007F"}, "tcp6": {"00000000000000000000000001000000"}}


def test_single_process_group_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", LISTENING], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    sockets = [line.split() for line in out.splitlines() if line.startswith("tcp")]
    public = [(table, address) for table, address in sockets if address not in LOOPBACK[table]]
    assert not public, f"listening beyond loopback: {public}"


def test_run_recipe_is_written_through_the_secret_scrubber(tmp_path, monkeypatch):
    from omni_moe.training.recipe import load_recipe
    from omni_moe.training.run_folder import save_run_recipe

    secret = "hf_SECRETvalue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = load_recipe("tests/distributed/loop_recipe.yaml", [f"data.sources.synth=https://user:{secret}@host/x"])
    save_run_recipe(recipe, tmp_path)
    text = (tmp_path / "recipe.yaml").read_text()
    assert secret not in text and "<redacted:HF_TOKEN>" in text
    assert yaml.safe_load(text)["run"] == recipe.raw["run"]  # the rest is the resolved recipe, unchanged
