"""apply_retention on hand-built checkpoint directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_builder import RUN_ID, write_checkpoint
from resilient.checkpoint.layout import MARKER_NAME, checkpoint_name
from resilient.checkpoint.retention import apply_retention


def names(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_retention_keeps_newest_k(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        write_checkpoint(tmp_path, step)

    removed = apply_retention(tmp_path, RUN_ID, keep=2)

    assert removed == [tmp_path / checkpoint_name(10), tmp_path / checkpoint_name(20)]
    assert names(tmp_path) == [checkpoint_name(30), checkpoint_name(40)]


def test_retention_fewer_than_keep(tmp_path: Path) -> None:
    for step in (10, 20):
        write_checkpoint(tmp_path, step)

    removed = apply_retention(tmp_path, RUN_ID, keep=3)

    assert removed == []
    assert names(tmp_path) == [checkpoint_name(10), checkpoint_name(20)]


def test_retention_counts_by_step(tmp_path: Path) -> None:
    # Created out of order, so directory order and modification times disagree with step order.
    for step in (300, 20, 1000, 5):
        write_checkpoint(tmp_path, step)

    apply_retention(tmp_path, RUN_ID, keep=2)

    assert names(tmp_path) == [checkpoint_name(300), checkpoint_name(1000)]


def test_retention_keeps_newest_complete(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    write_checkpoint(tmp_path, 30, marker=False)
    (write_checkpoint(tmp_path, 40) / MARKER_NAME).write_text("{not json")
    (write_checkpoint(tmp_path, 50) / "__0_0.distcp").unlink()
    write_checkpoint(tmp_path, 60, name=checkpoint_name(60) + ".tmp-ab12cd34")

    removed = apply_retention(tmp_path, RUN_ID, keep=1)

    assert removed == [tmp_path / checkpoint_name(10)]
    assert names(tmp_path) == [checkpoint_name(20), checkpoint_name(30), checkpoint_name(40), checkpoint_name(50),
                               checkpoint_name(60) + ".tmp-ab12cd34"]


def test_retention_skips_unrelated_entries(tmp_path: Path) -> None:
    unrelated = {
        "notes.txt": "a file",
        "run.json": '{"run_id": "run-a"}',
    }
    for name, text in unrelated.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("x")
    write_checkpoint(tmp_path, 1, name="step_old")
    write_checkpoint(tmp_path, 2, name=checkpoint_name(2) + ".superseded-ab12")
    write_checkpoint(tmp_path, 3, run_id="run-b")
    write_checkpoint(tmp_path, 4, run_id="run-b")
    for step in (10, 20):
        write_checkpoint(tmp_path, step)
    before = names(tmp_path)

    removed = apply_retention(tmp_path, RUN_ID, keep=1)

    assert removed == [tmp_path / checkpoint_name(10)]
    assert names(tmp_path) == [name for name in before if name != checkpoint_name(10)]
    assert (tmp_path / "tensorboard" / "events").read_text() == "x"
    for name, text in unrelated.items():
        assert (tmp_path / name).read_text() == text


def test_retention_leaves_other_run(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step, run_id="run-b")
    write_checkpoint(tmp_path, 5)

    removed = apply_retention(tmp_path, RUN_ID, keep=1)

    assert removed == []
    assert names(tmp_path) == [checkpoint_name(step) for step in (5, 10, 20, 30)]


@pytest.mark.parametrize("keep", [0, -1])
def test_retention_keep_below_one(tmp_path: Path, keep: int) -> None:
    write_checkpoint(tmp_path, 10)

    with pytest.raises(ValueError) as raised:
        apply_retention(tmp_path, RUN_ID, keep=keep)

    assert str(raised.value) == f"keep must be at least 1, got {keep}"
    assert names(tmp_path) == [checkpoint_name(10)]
