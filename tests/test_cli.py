"""The ``resilient`` command, run as a subprocess on hand-built checkpoint directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_builder import RUN_ID, write_checkpoint
from resilient.checkpoint.layout import MARKER_NAME, checkpoint_name, write_run_id


def resilient_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with complete steps 10 and 20, a partial 30, a corrupt 40 and another run's 50."""
    root = tmp_path / "ckpt"
    root.mkdir()
    write_run_id(root, RUN_ID)
    write_checkpoint(root, 10, reason="periodic")
    write_checkpoint(root, 20, reason="preemption")
    write_checkpoint(root, 30, name=checkpoint_name(30) + ".tmp-ab12cd34")
    (write_checkpoint(root, 40) / "__0_0.distcp").unlink()
    write_checkpoint(root, 50, run_id="run-b")
    return root


def test_cli_ls_table(run_dir: Path) -> None:
    result = resilient_cli("ls", str(run_dir), cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "REASON", "WORLD", "SIZE", "TIME", "(UTC)", "PATH"]
    rows = [line.split() for line in lines[1:] if not line.startswith(" " * 11)]
    assert [(row[0], row[1], row[2], row[3], row[-1]) for row in rows] == [
        ("10", "complete", "periodic", "1", str(run_dir / checkpoint_name(10))),
        ("20", "complete", "preemption", "1", str(run_dir / checkpoint_name(20))),
        ("30", "partial", "-", "-", str(run_dir / (checkpoint_name(30) + ".tmp-ab12cd34"))),
        ("40", "corrupt", "periodic", "1", str(run_dir / checkpoint_name(40))),
        ("50", "foreign", "periodic", "1", str(run_dir / checkpoint_name(50))),
    ]
    assert "file __0_0.distcp listed in the manifest is missing" in result.stdout
    assert f"written by run run-b, this directory belongs to run {RUN_ID}" in result.stdout


def test_cli_ls_json(run_dir: Path) -> None:
    result = resilient_cli("ls", str(run_dir), "--json", cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    fields = ("step", "status", "reason", "world_size", "path")
    assert [tuple(record[name] for name in fields) for record in records] == [
        (10, "complete", "periodic", 1, str(run_dir / checkpoint_name(10))),
        (20, "complete", "preemption", 1, str(run_dir / checkpoint_name(20))),
        (30, "partial", None, None, str(run_dir / (checkpoint_name(30) + ".tmp-ab12cd34"))),
        (40, "corrupt", "periodic", 1, str(run_dir / checkpoint_name(40))),
        (50, "foreign", "periodic", 1, str(run_dir / checkpoint_name(50))),
    ]
    assert records[1]["run_id"] == RUN_ID
    assert records[1]["bytes"] == sum(path.stat().st_size for path in (run_dir / checkpoint_name(20)).iterdir())


def test_cli_latest_newest_complete(run_dir: Path) -> None:
    result = resilient_cli("latest", str(run_dir), cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{run_dir / checkpoint_name(20)}\n"
    assert result.stderr == ""


def test_cli_latest_none_complete(tmp_path: Path) -> None:
    write_run_id(tmp_path, RUN_ID)
    write_checkpoint(tmp_path, 10, marker=False)
    (write_checkpoint(tmp_path, 20) / MARKER_NAME).write_text("{")
    write_checkpoint(tmp_path, 30, run_id="run-b")

    result = resilient_cli("latest", str(tmp_path), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"error: no complete checkpoint in {tmp_path}\n"


def test_cli_latest_missing_dir(tmp_path: Path) -> None:
    result = resilient_cli("latest", str(tmp_path / "absent"), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"error: checkpoint directory {tmp_path / 'absent'} does not exist\n"


def test_cli_verify_ok(run_dir: Path) -> None:
    result = resilient_cli("verify", str(run_dir / checkpoint_name(10)), cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: ")
    assert "xxh3_128" in result.stdout


def test_cli_verify_reports_each_mismatch(run_dir: Path) -> None:
    path = run_dir / checkpoint_name(20)
    names = sorted(p.name for p in path.iterdir() if p.name != MARKER_NAME)
    assert len(names) >= 2
    flipped = bytearray((path / names[0]).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other bytes
    (path / names[0]).write_bytes(bytes(flipped))
    (path / names[1]).write_bytes((path / names[1]).read_bytes()[:-1])  # truncated

    result = resilient_cli("verify", str(path), cwd=run_dir.parent)

    assert result.returncode == 1
    assert f"{path / names[0]}: xxh3_128 is" in result.stdout
    assert f"{path / names[1]}: size is" in result.stdout
    assert "FAILED: 2 problem(s)" in result.stderr


@pytest.mark.parametrize("case", ["no-marker", "bad-json"])
def test_cli_verify_rejects_unmarked_or_unreadable(run_dir: Path, case: str) -> None:
    path = run_dir / checkpoint_name(10)
    if case == "no-marker":
        (path / MARKER_NAME).unlink()
    else:
        (path / MARKER_NAME).write_text("{not json")

    result = resilient_cli("verify", str(path), cwd=run_dir.parent)

    assert result.returncode == 1
    assert result.stderr.startswith("FAILED: ")
    assert MARKER_NAME in result.stderr


def test_cli_clean_dry_run_lists_partial_only(run_dir: Path) -> None:
    before = sorted(p.name for p in run_dir.iterdir())

    result = resilient_cli("clean", str(run_dir), cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    assert f"would remove {run_dir / (checkpoint_name(30) + '.tmp-ab12cd34')}" in result.stdout
    assert checkpoint_name(10) not in result.stdout
    assert "dry run: nothing was removed" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_cli_clean_yes_removes_partial_and_named(run_dir: Path) -> None:
    result = resilient_cli("clean", str(run_dir), checkpoint_name(10), "--yes", cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted(["run.json", checkpoint_name(20), checkpoint_name(40), checkpoint_name(50)])


def test_cli_clean_unknown_name(run_dir: Path) -> None:
    result = resilient_cli("clean", str(run_dir), "step_000000099", cwd=run_dir.parent)

    assert result.returncode == 2
    assert "no checkpoint directory named step_000000099" in result.stderr


def test_cli_clean_removes_link_not_target(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not part of any checkpoint")
    link = run_dir / (checkpoint_name(60) + ".tmp-aaaaaaaa")
    link.symlink_to(target)

    result = resilient_cli("clean", str(run_dir), "--yes", cwd=run_dir.parent)

    assert result.returncode == 0, result.stderr
    assert "symbolic link, its target is kept" in result.stdout
    assert not link.is_symlink()
    assert not link.exists()
    assert (target / "keep.txt").read_text() == "not part of any checkpoint"
    assert not list(run_dir.glob(checkpoint_name(30) + ".tmp-*"))
