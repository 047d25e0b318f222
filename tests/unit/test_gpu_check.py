"""launch/gpu_check.sh in its CPU mode, as CI runs it: the parts that need no GPU run and report.

On a GPU machine the same script also runs the tiny-omni recipe on one GPU and the 1 B-active benchmarks; here it
runs tests/gpu (every test skipped and counted) and the benchmarks at the tiny preset on the CPU, and the report's
FLOPs must be the dry run's cost model's.
"""

from __future__ import annotations

import json
import re

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni.benchmarks.gpu import PRESETS
from omni_moe.training.cost_model import forward_flops_per_token
from tests.launching import REPO_ROOT, launcher_env, run_in_session


def test_gpu_check_cpu_mode_runs_its_parts_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu_check"
    run_in_session(["bash", str(REPO_ROOT / "launch" / "gpu_check.sh"), "--cpu", str(out)], timeout_s=300,
                   env=launcher_env())
    summary = (out / "summary.md").read_text()
    gpu_tests = len(re.findall(r"^def test_|^    def test_", (REPO_ROOT / "tests/gpu/test_cuda.py").read_text(),
                               re.M))
    parametrized = 1  # the MoE-block test runs for fp32 and bf16
    assert re.search(rf"\| gpu_tests \| 0 \| .* {gpu_tests + parametrized} skipped", summary), summary
    assert re.search(r"\| benchmarks \| 0 \|", summary), summary
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == "fp32" and report["preset"] == "tiny" and report["peak_tflops"] is None
    assert set(report["moe"]["ms"]) == {"ours", "transformers-grouped_mm"} and min(report["moe"]["ms"].values()) > 0
    step = report["step"]
    preset = PRESETS["tiny"]
    expected = 3 * forward_flops_per_token(OmniMoeConfig(**preset["model"]), preset["seq"]) / 1e9
    assert abs(step["model_gflop_per_token"] - expected) < 1e-12
    assert step["tokens_per_step"] == preset["batch"] * preset["seq"] and step["tokens_per_s"] > 0
    assert step["mfu"] is None  # no peak is known for a CPU: no made-up MFU
    assert "## Training step" in (out / "report.md").read_text()
