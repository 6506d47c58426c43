"""The artifact layout: atomic commits, never overwriting, safe to start twice, crash leftovers kept aside."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from kubetune.artifacts import SUCCESS_MARKER, RunLayout
from kubetune.errors import ArtifactError, StageBusyError


def test_commit_writes_report_then_marker(tmp_path):
    layout = RunLayout(tmp_path, "r1")
    tmp = layout.new_temp_dir("merge")
    (tmp / "weights.bin").write_text("w")
    final = layout.commit("merge", tmp, "fp1", {"duration_s": 1.5})
    assert not tmp.exists()
    assert (final / "weights.bin").read_text() == "w"
    assert json.loads((final / "report.json").read_text())["duration_s"] == 1.5
    assert json.loads((final / SUCCESS_MARKER).read_text())["fingerprint"] == "fp1"
    assert layout.state("merge", "fp1") == "done"
    assert layout.state("merge", "other") == "stale"
    assert layout.state("quantize", "fp1") == "missing"


def test_a_finished_artifact_is_never_overwritten(tmp_path):
    layout = RunLayout(tmp_path, "r1")
    layout.commit("merge", layout.new_temp_dir("merge"), "fp1", {})
    with pytest.raises(ArtifactError, match="never overwritten"):
        layout.commit("merge", layout.new_temp_dir("merge"), "fp2", {})
    assert layout.state("merge", "fp1") == "done"


def test_partial_output_without_marker_is_moved_aside_not_deleted(tmp_path):
    layout = RunLayout(tmp_path, "r1")
    partial = layout.stage_dir("merge")
    partial.mkdir(parents=True)
    (partial / "half.bin").write_text("x")
    layout.commit("merge", layout.new_temp_dir("merge"), "fp1", {})
    kept = list((layout.run_dir / ".trash").glob("merge-*/half.bin"))
    assert len(kept) == 1


def test_require_names_the_missing_stage(tmp_path):
    with pytest.raises(ArtifactError, match="stage 'finetune' has not finished"):
        RunLayout(tmp_path, "r1").require("finetune")


def _hold_lock(root, ready, release):
    layout = RunLayout(root, "r1")
    with layout.lock("finetune"):
        ready.set()
        release.wait(10)


def test_a_second_process_gets_a_retryable_busy_error(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(StageBusyError) as info:
            with RunLayout(tmp_path, "r1").lock("finetune"):
                pass
        assert info.value.permanent is False
    finally:
        release.set()
        proc.join(10)
    with RunLayout(tmp_path, "r1").lock("finetune"):  # free again once the holder exits
        time.sleep(0)


def test_new_temp_dir_clears_crash_leftovers_of_that_stage_only(tmp_path):
    layout = RunLayout(tmp_path, "r1")
    old = layout.new_temp_dir("merge")
    other = layout.new_temp_dir("quantize")
    new = layout.new_temp_dir("merge")
    assert not old.exists() and other.exists() and new.exists()
