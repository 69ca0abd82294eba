"""The smoke pipeline end to end: four stages, the expert-vs-base check, exports usable by generate."""
from __future__ import annotations

import math

import pytest

from mmrec.train import read_export
from mmrec.train.smoke import run_smoke


@pytest.mark.slow
def test_smoke_pipeline_runs_all_stages_and_checks_experts(tmp_path):
    lines = []
    summary = run_smoke(tmp_path, steps_scale=0.03, max_mb=0.6, val_fraction=0.1, log=lines.append)
    for domain in ("text", "code"):
        assert summary[f"stage2-{domain}"] < summary[f"base-{domain}"]  # run_smoke raises otherwise, too
    assert all(math.isfinite(v) for v in summary.values())
    assert read_export(tmp_path / "stage3" / "final").kind == "mmrec"
    assert read_export(tmp_path / "stage2-code" / "best").kind == "expert"
    assert (tmp_path / "stage3" / "final" / "tokenizer.json").is_file()
    out = "\n".join(lines)
    assert "text val loss: expert" in out and "[fused] 'import '" in out and "validation perplexity per stage" in out
