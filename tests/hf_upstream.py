"""transformers' own generic model tests, fetched from its source distribution by `bash launch/install.sh test`.

The wheel does not ship transformers' tests; the sdist of the installed version carries `tests/test_modeling_common.py`
(the `ModelTesterMixin` every model in transformers passes). install.sh extracts it into
`.cache/transformers-tests/<version>/tests/` (gitignored: upstream files are fetched, never copied into the repo).
That file imports two siblings the sdist lacks (`generation/test_utils.py`, `exporters/test_export.py`), so it is
imported as a package whose search path lists the extracted folder first and our stand-ins
(`tests/hf_upstream_standins/`) second; upstream's relative imports then find ours for exactly those two.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "transformers_upstream_tests"


def upstream_tests_dir() -> Path:
    return REPO / ".cache" / "transformers-tests" / transformers.__version__ / "tests"


def upstream_module(name: str):
    """Import `<extracted tests>/<name>.py` (e.g. "test_modeling_common") as part of the upstream tests package.

    Raises a RuntimeError naming the fix when the files were not fetched: a missing contract suite must fail, not skip.
    """
    folder = upstream_tests_dir()
    if not (folder / f"{name}.py").is_file():
        raise RuntimeError(
            f"transformers {transformers.__version__}'s generic tests are missing ({folder / (name + '.py')}): "
            "run `bash launch/install.sh test` to fetch them from its source distribution"
        )
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(folder), str(Path(__file__).resolve().parent / "hf_upstream_standins")]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (measured: the contract + tools + generate
    modules took 199 s with torch's default threads against 59 s with one, under other jobs' load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
