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
