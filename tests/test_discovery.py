"""Classification of hand-built checkpoint directories by discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_builder import RUN_ID, edit_manifest, write_checkpoint
from resilient.checkpoint.discovery import COMPLETE, CORRUPT, FOREIGN, PARTIAL, complete_newest_first, inspect, scan
from resilient.checkpoint.layout import MARKER_NAME, parse_dir_name


def only(root: Path):
    infos = scan(root, RUN_ID)
    assert len(infos) == 1, f"expected one checkpoint directory, found {[info.path.name for info in infos]}"
    return infos[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("step_000000010", (10, "final")),
        ("step_7", (7, "final")),
        ("step_000000010.tmp-ab12cd34", (10, "tmp")),
        ("step_000000010.deleting-ab12", (10, "deleting")),
        ("step_000000010.superseded-ab12", (10, "superseded")),
        ("step_000000010\n", None),
        ("step_000000010.tmp-ab12\n", None),
        ("step_000000010.tmp-", None),
        ("step_000000010.backup-ab12", None),
        ("step_", None),
        ("step_x", None),
        ("xstep_000000010", None),
        ("run.json", None),
    ],
)
def test_parse_dir_name(name: str, expected) -> None:
    assert parse_dir_name(name) == expected


def test_scan_complete_checkpoint(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10, reason="preemption")

    info = only(tmp_path)

    assert info.path == path
    assert info.step == 10
    assert info.status == COMPLETE
    assert info.problem is None
    assert info.reason == "preemption"
    assert info.world_size == 1
    assert info.manifest.run_id == RUN_ID


def test_scan_missing_marker_partial(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10, marker=False)

    info = only(tmp_path)

    assert info.status == PARTIAL
    assert info.problem == f"no {MARKER_NAME} completion marker"
    assert info.manifest is None


def test_scan_invalid_json_corrupt(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10)
    (path / MARKER_NAME).write_text('{"step": 10, "files": [')

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert "is not valid JSON" in info.problem


def test_scan_marker_directory_corrupt(tmp_path: Path) -> None:
    # The tests run as root, so chmod 000 would not stop the read. A directory
    # in place of the marker makes reading it fail with an OSError instead.
    path = write_checkpoint(tmp_path, 10, marker=False)
    (path / MARKER_NAME).mkdir()

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert "Is a directory" in info.problem


def test_scan_marker_invalid_utf8_corrupt(tmp_path: Path) -> None:
    # Stands in for an unreadable marker, because chmod cannot block root.
    path = write_checkpoint(tmp_path, 10)
    (path / MARKER_NAME).write_bytes(b'{"step": "\xff\xfe"}')

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert "is not UTF-8 text" in info.problem


def test_scan_missing_file_corrupt(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10)
    (path / "__0_0.distcp").unlink()

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert info.problem == "file __0_0.distcp listed in the manifest is missing"


def test_scan_truncated_file_corrupt(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10, files={"__0_0.distcp": b"0123456789"})
    with open(path / "__0_0.distcp", "r+b") as handle:
        handle.truncate(3)

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert info.problem == "file __0_0.distcp has 3 bytes, the manifest says 10"


def test_scan_no_files_listed_corrupt(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10, files={})

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert info.problem == "the manifest lists no files"


@pytest.mark.parametrize("listed", ["../x", "/etc/passwd", "..", "sub/file", "a\\b", "", "bad\0name"])
def test_scan_escaping_path_corrupt(tmp_path: Path, listed: str) -> None:
    path = write_checkpoint(tmp_path, 10)
    (tmp_path / "x").write_bytes(b"data of step 10")

    def point_outside(payload: dict) -> None:
        payload["files"][1]["path"] = listed

    edit_manifest(path, point_outside)

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert f"file path {listed!r}" in info.problem


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("trainer", 5, "field 'trainer' has invalid value 5"),
        ("versions", ["torch"], "field 'versions' has invalid value ['torch']"),
        ("step", "10", "field 'step' has invalid value '10'"),
        ("step", True, "field 'step' has invalid value True"),
        ("reason", "whim", "field 'reason' has unknown value 'whim'"),
        ("format_version", 2, "format_version is 2"),
        ("format", "other", "format is 'other'"),
        ("run_id", None, "field 'run_id' has invalid value None"),
    ],
)
def test_scan_invalid_field_corrupt(tmp_path: Path, field: str, value, message: str) -> None:
    path = write_checkpoint(tmp_path, 10)
    edit_manifest(path, lambda payload: payload.__setitem__(field, value))

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert message in info.problem


@pytest.mark.parametrize("size_text", ["1e400", '"ten"', "null"])
def test_scan_invalid_file_size_corrupt(tmp_path: Path, size_text: str) -> None:
    path = write_checkpoint(tmp_path, 10, files={"__0_0.distcp": b"0123456789"})
    marker = path / MARKER_NAME
    marker.write_text(marker.read_text().replace('"size": 10', f'"size": {size_text}'))

    info = only(tmp_path)

    assert info.status == CORRUPT
    assert "file entry" in info.problem


def test_scan_step_mismatch_corrupt(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 10)
    edit_manifest(path, lambda payload: payload.__setitem__("step", 11))

    info = only(tmp_path)

    assert info.step == 10
    assert info.status == CORRUPT
    assert info.problem == "the manifest says step 11"


def test_scan_other_run_foreign(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10, run_id="run-b")

    info = only(tmp_path)

    assert info.status == FOREIGN
    assert info.problem == f"written by run run-b, this directory belongs to run {RUN_ID}"


def test_scan_without_run_id_complete(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10, run_id="run-b")

    infos = scan(tmp_path, None)

    assert [info.status for info in infos] == [COMPLETE]


def test_staging_dir_newer_not_chosen(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20, name="step_000000020.tmp-ab12cd34")

    infos = scan(tmp_path, RUN_ID)
    newest = complete_newest_first(tmp_path, RUN_ID)

    assert [(info.step, info.status) for info in infos] == [(10, COMPLETE), (20, PARTIAL)]
    assert infos[1].problem == "staging directory of an unfinished save"
    assert [info.step for info in newest] == [10]


def test_complete_newest_first_skips_broken(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 40, marker=False)
    (write_checkpoint(tmp_path, 50) / "__0_0.distcp").unlink()
    write_checkpoint(tmp_path, 60, run_id="run-b")

    newest = complete_newest_first(tmp_path, RUN_ID)

    assert [info.step for info in newest] == [30, 20, 10]


def test_scan_sorted_oldest_first(tmp_path: Path) -> None:
    for step in (100, 9, 30):
        write_checkpoint(tmp_path, step)

    assert [info.step for info in scan(tmp_path, RUN_ID)] == [9, 30, 100]


def test_scan_ignores_unrelated_entries(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "step_abc").mkdir()
    (tmp_path / "step_000000005").write_text("a file with a checkpoint name")
    (tmp_path / "run.json").write_text("{}")

    assert scan(tmp_path, RUN_ID) == []


def test_scan_empty_root(tmp_path: Path) -> None:
    assert scan(tmp_path, RUN_ID) == []
    assert complete_newest_first(tmp_path, RUN_ID) == []


def test_scan_missing_root(tmp_path: Path) -> None:
    assert scan(tmp_path / "absent", RUN_ID) == []


def test_inspect_non_checkpoint_name(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()

    assert inspect(tmp_path / "notes", RUN_ID) is None
