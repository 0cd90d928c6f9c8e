"""bench/gpu_check.py where there is no GPU: one line and exit status 0; its machinery, rehearsed on the CPU."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def gpu_check(*args):
    return subprocess.run([sys.executable, "bench/gpu_check.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = gpu_check("--json", tmp_path / "gpu_check.json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, ")
    assert lines[0].endswith("; nothing to check (README: GPU)")
    assert not (tmp_path / "gpu_check.json").exists()


def test_a_rehearsed_row_reaches_the_table_and_the_json(tmp_path):
    done = gpu_check("--rehearse_on_cpu", "--only", "bad_device", "--json", tmp_path / "gpu_check.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--device cuda:N beyond the count  PASS" in done.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["id"], r["status"]) for r in figures["rows"]] == [("bad_device", "PASS")]
    assert figures["throughput"] is None and figures["torch"] == torch.__version__
