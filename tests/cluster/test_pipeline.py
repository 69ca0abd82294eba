"""The CPU smoke pipeline end to end, exactly as `make smoke` runs it (its own Ray head, real prep of the
demo corpus, four stage jobs over `ray job submit`'s API, evaluation and a sample)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_smoke_pipeline_runs_every_stage_and_stage2_beats_the_base(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "launchers.pipeline", "--out", str(tmp_path / "smoke")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    for stage in ("stage1", "stage2-text", "stage2-code", "stage3"):
        match = re.search(rf"\[pipeline\] {stage} finished \(\d+s\): validation perplexity ([\d.]+)", output)
        assert match and 1 < float(match.group(1)) < 2048, f"{stage} printed no validation perplexity"
    assert output.count("(lower, as required)") == 2
    sample = output.split("sample from the fused model, prompt 'def ':\n", 1)[1]
    assert sample.startswith("def ") and len(sample.split("\n[pipeline] pipeline finished")[0]) > len("def ") + 10
    assert (tmp_path / "smoke" / "logs" / "stage3.log").is_file()
