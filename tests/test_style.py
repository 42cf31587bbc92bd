import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with `pip install '.[test]'`)")
    paths = [p for p in ("scratchdet", "tests", "benchmarks") if (ROOT / p).is_dir()]
    result = subprocess.run([ruff, "check", *paths], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
