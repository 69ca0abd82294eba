"""The CPU smoke pipeline end to end, exactly as `make smoke` runs it (its own Ray head, real prep of the
demo corpus, four stage jobs over the job API, evaluation, checks and a sample), and what it leaves
behind: report.json, evaluation.json and report.png, and each stage's metrics.jsonl and loss.png,
checked against each other and against the run."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from mmrec.train.records import loss_curves, read_records

from .conftest import REPO

pytestmark = pytest.mark.slow
STAGES = ("stage1", "stage2-text", "stage2-code", "stage3")


def test_smoke_pipeline_passes_its_checks_and_leaves_its_records(tmp_path):
    out = tmp_path / "smoke"
    run = subprocess.run([sys.executable, "-m", "launchers.pipeline", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "Traceback" not in output
    assert output.count("[pipeline] PASS: ") == 6 and "FAIL" not in output
    # Every stage's workers started with the allocator set up to reuse large blocks (cluster.launch.worker_env).
    assert output.count("CPU allocator keeps freed memory and reuses large blocks") == len(STAGES), output[-5000:]
    for stage in STAGES:
        assert re.search(rf"{stage} \| \[{stage}\] step \d+/\d+ \| .* \| eta ", output), f"no progress of {stage}"

    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES) and all(v["passed"] for v in report["verdicts"])
    assert report["evaluation"] == json.loads((out / "evaluation.json").read_text())
    assert report["sample"]["prompt"] == "def " and len(report["sample"]["text"]) > 10
    assert report["config"]["prep"]["vocab_size"] == 2048 and report["versions"]["torch"].startswith("2.13")
    fused, oracle = report["evaluation"]["fused"]["mixed"]["loss"], report["evaluation"]["oracle-routed experts"]["mixed"]["loss"]
    assert fused <= oracle + 0.02

    import matplotlib.image

    for stage in STAGES:
        run_dir = out / "stages" / stage
        records = read_records(str(run_dir))
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        assert train and evals and train[-1]["step"] == report["stages"][stage]["steps"]
        assert min(r["val_loss"] for r in evals) == pytest.approx(report["stages"][stage]["best_val_loss"])
        curves = loss_curves(records)
        assert curves["train"][1] == [r["loss"] for r in train]
        png = run_dir / "loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png)[..., :3].std() > 0.05  # curves drawn, not a blank sheet
        assert (run_dir / "exports" / "best").is_file() and (out / "logs" / f"{stage}.log").is_file()
    sheet = matplotlib.image.imread(out / "report.png")
    assert sheet.shape[0] >= 600 and sheet.shape[1] >= 1000 and sheet[..., :3].std() > 0.05
