"""scipy's own tests of linear_sum_assignment, run against fastvlp's drop-in.

The test file ships inside the scipy wheel; it is loaded from there with its
``from scipy.optimize import linear_sum_assignment`` bound to fastvlp's function.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import scipy

import fastvlp.ops

SCIPY_TEST_FILE = Path(scipy.__file__).parent / "optimize" / "tests" / "test_linear_assignment.py"


def _load_scipy_suite():
    if not SCIPY_TEST_FILE.exists():
        pytest.skip(f"this scipy install has no test files ({SCIPY_TEST_FILE})", allow_module_level=True)
    source = SCIPY_TEST_FILE.read_text()
    import_line = "from scipy.optimize import linear_sum_assignment"
    assert import_line in source, "scipy's test file changed its import; update this loader"
    source = source.replace(import_line, "from fastvlp.ops import linear_sum_assignment")
    spec = importlib.util.spec_from_loader("scipy_lsap_suite", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(SCIPY_TEST_FILE), "exec"), module.__dict__)
    sys.modules[spec.name] = module
    return module


_suite = _load_scipy_suite()
assert _suite.linear_sum_assignment is fastvlp.ops.linear_sum_assignment
globals().update({name: value for name, value in vars(_suite).items() if name.startswith("test_")})
