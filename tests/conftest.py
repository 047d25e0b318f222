"""pytest configuration shared by every test folder."""

# Stand-in modules for files that transformers' source distribution lacks (tests/hf_upstream.py explains); their names
# are test_*.py because upstream's relative imports need them, but they hold no tests.
collect_ignore = ["hf_upstream_standins"]

# Markers that transformers' generic tests (tests/hf_upstream.py) put on their tests; registered here because our
# pytest runs with --strict-markers. They only label upstream tests (none selects or skips anything here).
UPSTREAM_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                    "torch_compile_test")


def pytest_configure(config):
    for name in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{name}: a label on transformers' generic tests")


# data/, training/ and modeling/ install as omni_moe.data etc. (pyproject.toml); the repository root is on sys.path
# here, so a stray `import data...` would load a second copy under the bare name (other module objects: isinstance
# checks and registries would split). Fail the session when that happened.
def pytest_sessionfinish(session, exitstatus):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    twice = sorted(name for name, module in list(sys.modules.items())
                   if name.split(".")[0] in ("data", "training", "modeling")
                   and Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(root))
    if twice:
        print(f"\nconftest: imported under the bare folder name (use omni_moe.<package>): {twice}", file=sys.stderr)
        session.exitstatus = 1
