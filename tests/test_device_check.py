"""native/device-check.sh end to end on the CPU backend (--quick, reusing the installed library):
the pack, the random-weight models, the evidence comparison, the tests and the speed table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_runs_on_cpu(tmp_path):
    import llama_cpp

    env = {**os.environ, "PYTHON": sys.executable}
    pack = subprocess.run(
        ["bash", "native/device-check.sh", "--pack"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert pack.returncode == 0, pack.stderr
    pack_bytes = sum(f.stat().st_size for f in (ROOT / ".devpack").rglob("*") if f.is_file())
    assert pack_bytes < 40e6, f"the carried tree is {pack_bytes / 1e6:.1f} MB"
    lib = Path(llama_cpp.__file__).parent / "lib"
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", "native/device-check.sh", "--cpu", "--quick", "--lib", str(lib), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "device-check.json").read_text())
    assert result["pass"] and result["backend"] == "cpu"
    assert len(result["evidence"]) == 4 and all(r["max_abs_diff"] < 1e-3 for r in result["evidence"])
    assert "passed" in result["pytest"]["summary"] and "failed" not in result["pytest"]["summary"]
    methods = {r["method"] for r in result["speed"]["rows"]}
    assert {"full", "streaming", "ams-tova", "ams-tova [step]"} <= methods
    assert "**PASS**" in (out / "device-check.md").read_text()


def test_device_check_refuses_bad_arguments():
    r = subprocess.run(["bash", "native/device-check.sh", "--nonsense"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument" in r.stderr and "Traceback" not in r.stderr
