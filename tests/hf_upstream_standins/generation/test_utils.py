"""Stand-in for transformers' `tests/generation/test_utils.py`, which the source distribution on PyPI does not carry.

`tests/test_modeling_common.py` imports `GenerationTesterMixin` from it only to check that a tester of a model that can
generate inherits it. Without the upstream file, generation is covered by our own tests
(tests/unit/test_hf_contract_generate.py), so this base adds no tests.
"""


class GenerationTesterMixin:
    """Empty base: the upstream generation tests are not in the sdist (see the module docstring)."""
