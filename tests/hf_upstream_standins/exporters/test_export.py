"""Stand-in for transformers' `tests/exporters/test_export.py`, which the source distribution on PyPI does not carry.

`ModelTesterMixin` derives from `ExportTesterMixin`; its `torch.export` tests are replaced by our own
(tests/unit/test_hf_tools.py exports the forward for a fixed shape), so this base adds no tests.
"""


class ExportTesterMixin:
    """Empty base: the upstream export tests are not in the sdist (see the module docstring)."""
