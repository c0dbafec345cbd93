"""gpu_check.py, the prepared GPU measurement, on the CPU: its tiny presets run every measurement's
code path (pre-training benchmark per policy with its traced peak, the WikiText benchmark, the
sampler) and write the JSON and the table the README takes its GPU figures from."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_its_tiny_presets_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--device", "cpu", "--out-dir",
                        str(tmp_path / "check")], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.load(open(tmp_path / "check" / "gpu_check.json"))
    assert out["device"] == "cpu" and len(out["results"]) == 4
    assert not [x for x in out["results"] if "error" in x], out["results"]
    pretrain = [x for x in out["results"] if "tokens_per_sec_per_gpu" in x]
    assert [x["ac"] for x in pretrain] == ["none", "full"] and all(x["traced_peak_gib"] > 0 for x in pretrain)
    table = (tmp_path / "check" / "gpu_check.md").read_text()
    assert table.startswith("Measured on cpu by `python gpu_check.py`") and table.count("\n| ") >= 6
