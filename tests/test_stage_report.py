"""report.json goes through one model: every reader shows the same GPU peak and the stage's own headline."""

from __future__ import annotations

import pytest

from kubetune import report as report_md
from kubetune.k8s.state import summary_of
from kubetune.runner import _peak, key_metric
from kubetune.stage_report import report_of

GIB = 2**30


@pytest.mark.parametrize("figures, expected", [
    ({"nvml_process_bytes": 3 * GIB, "torch_reserved_bytes": 2 * GIB, "torch_allocated_bytes": GIB}, 3 * GIB),
    ({"torch_reserved_bytes": 2 * GIB, "torch_allocated_bytes": GIB}, 2 * GIB),  # no NVML in the pod
    ({"torch_allocated_bytes": GIB}, GIB),  # an old report: the allocator's figure only
    ({"nvml_process_bytes": 0, "torch_reserved_bytes": 0, "host_rss_bytes": GIB}, None),  # a CPU run
])
def test_the_summary_status_and_report_show_one_gpu_peak(figures, expected):
    data = {"stage": "merge", "duration_s": 1.0, "peak_memory": figures}
    assert report_of("merge", data).peak_memory.gpu_bytes == expected
    assert summary_of(data)["peak_vram_bytes"] == expected  # what `kubetune status` shows
    assert report_md.gpu_peak(data) == expected  # `kubetune report`'s tables and chart
    shown = _peak(data)  # `kubetune run`'s summary table
    assert (f"GPU {expected / GIB:.2f} GiB" in shown) if expected else "GPU" not in shown


def test_each_stage_reads_its_own_report_model_and_headline():
    assert key_metric("quantize", {"bits": 4, "memory_footprint_bytes": 300 * 2**20}) == "GPTQ 4-bit, 300 MiB"
    assert key_metric("evaluate", {"metrics": {"merged": {"execution_accuracy": 85.5}}}) == "merged 85.5%"
    old_run = report_of("no-longer-a-stage", {"duration_s": 2.0})  # a folder of an older kubetune: still read
    assert old_run.duration_s == 2.0 and old_run.headline() == ""



def test_a_report_json_that_is_no_stage_report_is_read_as_missing_not_as_a_crash_later(tmp_path):
    from kubetune.artifacts import RunLayout

    layout = RunLayout(tmp_path, "r")
    for stage, duration in (("merge", 3.0), ("quantize", "soon")):  # "soon": no number of seconds
        layout.report_path(stage).parent.mkdir(parents=True)
        layout.report_path(stage).write_text(f'{{"stage": "{stage}", "duration_s": "{duration}"}}'.replace(
            '"3.0"', "3.0"))
    assert layout.read_report("merge") == {"stage": "merge", "duration_s": 3.0}
    assert layout.read_report("quantize") is None
    built = report_md.build_report([tmp_path / "r"], estimates=False)  # before: TypeError formatting "soon"
    assert [t.title for t in built.tables] == ["merge"]
