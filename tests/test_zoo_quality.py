"""Ground truth: the zoo decompositions recover the known solutions (slow; CI runs them)."""

import json
import subprocess
import sys
import time

import pytest


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd_mcp.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_tms_5_2_recovers_every_feature(tmp_path):
    t0 = time.time()
    r = _cli("zoo", "build", "tms-5-2", "--out", str(tmp_path / "tms"), "--device", "cpu")
    build_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("evaluate", str(tmp_path / "tms"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    print(json.dumps({"build_seconds": round(build_s, 1), **result}))
    for layer in ("linear1", "linear2"):
        row = result["layers"][layer]
        assert row["alive"] == 5, (layer, row)
        assert row["mmcs"] >= 0.99, (layer, row)
        assert 0.95 <= row["ml2r"] <= 1.05, (layer, row)
