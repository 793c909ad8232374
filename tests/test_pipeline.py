"""Pipeline-parallel training: every stage's weights and optimizer state survive a preemption."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from jobs import REPO, Job, run_to_end, torchrun_command
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id

pytestmark = pytest.mark.integration

TRAIN_PIPELINE = REPO / "examples" / "train_pipeline.py"
ARGS = ["--save-every", "10", "--log-every", "1", "--data-bytes", "60000"]


def pipeline_command(ckpt: Path, max_steps: int, *extra: str) -> list[str]:
    return torchrun_command(TRAIN_PIPELINE, "--ckpt-dir", str(ckpt), "--max-steps", str(max_steps), *ARGS, *extra)


def test_pipeline_sigterm_resumes_exactly(tmp_path: Path) -> None:
    expected = run_to_end(pipeline_command(tmp_path / "reference", 40)).digest()
    ckpt = tmp_path / "ckpt"

    job = Job.start(pipeline_command(ckpt, 40))
    job.wait_for_step(14)
    job.process.send_signal(signal.SIGTERM)
    job.wait()
    reasons = {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE}
    assert "preemption" in reasons.values(), reasons

    resumed = run_to_end(pipeline_command(ckpt, 40))
    assert resumed.digest() == expected


def test_stage1_optimizer_moments_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    saved_prefix, resumed_prefix = tmp_path / "saved", tmp_path / "resumed"
    # The first run ends with its final save at step 20 and dumps each stage's optimizer.
    run_to_end(pipeline_command(ckpt, 20, "--dump-optimizer", str(saved_prefix)))
    # The second run resumes from step 20, trains nothing, and dumps what it restored.
    resumed_job = run_to_end(pipeline_command(ckpt, 20, "--dump-optimizer", str(resumed_prefix)))
    assert "Resumed from" in resumed_job.output

    saved = torch.load(f"{saved_prefix}.rank1.pt", weights_only=True)
    resumed = torch.load(f"{resumed_prefix}.rank1.pt", weights_only=True)
    assert len(saved["state"]) > 0
    assert saved["state"].keys() == resumed["state"].keys()
    for index, moments in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed["state"][index][name], moments[name]), f"param {index} {name}"
            assert torch.count_nonzero(moments[name]) > 0, f"param {index} {name} was never updated"
