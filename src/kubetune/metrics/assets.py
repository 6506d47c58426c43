"""The Grafana dashboard and the Prometheus alert rules, declared once here and written into the chart and the
kustomize component:

    python -m kubetune.metrics.assets           # write them (what `make monitoring` runs)
    python -m kubetune.metrics.assets --check   # exit 1 if a committed copy is stale

tests/test_metrics_assets.py fails on a stale copy, runs every panel's PromQL against a real Prometheus that
scraped a real stage, and runs ``promtool test rules`` on the rules.

Panels merge the two sources of each series with ``max by (...)``: a stage pod's scrape (PodMonitor) and the
Pushgateway's copy of its final values carry different job/instance labels; ``max`` keeps the higher, which is
the live figure while the stage runs and the final one after.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubetune.generated import write_or_check

RUN = 'run=~"$run"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
DASHBOARD_UID = "kubetune-stages"
# Alert thresholds: the chart's values override them (monitoring.alerts.*); kustomize users patch the rule.
DEFAULT_ALERTS = {"gpuMemoryRatio": 0.95, "gpuMemoryFor": "2m", "stalledMinutes": 15}
# Placeholders in the chart's copy of the rules, replaced by the template with the values above.
PLACEHOLDERS = {key: "KUBETUNE_" + re.sub("([A-Z])", r"_\1", key).upper() for key in DEFAULT_ALERTS}
STATUS_CODES = {"running": 1, "interrupted": 2, "done": 3, "failed": 4}  # timeline, by precedence


@dataclass
class Panel:
    title: str
    kind: str  # Grafana panel type
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    description: str = ""
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    field_config: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    instant: bool = False


def _by(labels: str, expr: str) -> str:
    return f"max by ({labels}) ({expr})"


def _timeline_expr() -> str:
    """One series per stage whose value is its status code; a later status wins over an earlier one."""
    parts = [f'{_by("run, stage", f"kubetune_stage_status{{{RUN}, status={status!r}}} == 1")} * {code}'
             for status, code in sorted(STATUS_CODES.items(), key=lambda kv: -kv[1])]
    return " or ".join(parts).replace("'", '"')


PANELS: list[Panel] = [
    Panel("GPU memory per stage: used, peak and capacity", "timeseries", "bytes", [
        (_by("run, stage, gpu", f"kubetune_gpu_memory_used_bytes{{{RUN}}}"), "{{stage}} GPU {{gpu}} device used"),
        (_by("run, stage, gpu", f"kubetune_gpu_process_memory_used_bytes{{{RUN}}}"), "{{stage}} GPU {{gpu}} stage"),
        (_by("run, stage, gpu", f"kubetune_gpu_process_memory_peak_bytes{{{RUN}}}"), "{{stage}} GPU {{gpu}} peak"),
        (_by("run, gpu", f"kubetune_gpu_memory_total_bytes{{{RUN}}}"), "GPU {{gpu}} capacity"),
    ], description="Device used counts every process on the GPU (as DCGM's FB_USED does); stage counts this "
                   "pod's processes, CUDA context included; peak is the highest stage figure seen.",
        width=24, overrides=[{"matcher": {"id": "byRegexp", "options": ".*capacity"},
                              "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                             {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]),
    Panel("torch allocator", "timeseries", "bytes", [
        (_by("run, stage, device", f"kubetune_torch_memory_{what}_bytes{{{RUN}}}"),
         "{{stage}} cuda:{{device}} " + legend)
        for what, legend in (("allocated", "allocated"), ("reserved", "reserved"), ("peak_reserved", "peak reserved"))
    ], description="Reserved minus allocated is the caching allocator's slack (fragmentation shows here)."),
    Panel("GPU utilisation", "timeseries", "percentunit", [
        (_by("run, stage, gpu", f"kubetune_gpu_utilization_ratio{{{RUN}}}"), "{{stage}} GPU {{gpu}}"),
    ], field_config={"min": 0, "max": 1}),
    Panel("Training loss", "timeseries", "none", [
        (_by("run", f"kubetune_train_loss{{{RUN}}}"), "{{run}} loss"),
    ]),
    Panel("Learning rate", "timeseries", "none", [
        (_by("run", f"kubetune_train_learning_rate{{{RUN}}}"), "{{run}} learning rate"),
    ]),
    Panel("Training throughput", "timeseries", "short", [
        (_by("run", f"kubetune_train_tokens_per_second{{{RUN}}}"), "{{run}} tokens/s (last steps)"),
        (f"sum by (run) (rate(kubetune_train_tokens_total{{{RUN}}}[$__rate_interval]))", "{{run}} tokens/s (rate)"),
    ], description="Trained tokens exclude padding. The rate drops to 0 at a pod restart, then resumes."),
    Panel("Progress", "bargauge", "percentunit", [
        (_by("run, stage", f"kubetune_stage_progress_ratio{{{RUN}}}"), "{{run}} {{stage}}"),
    ], field_config={"min": 0, "max": 1}, width=8, instant=True),
    Panel("Fine-tune steps and ETA", "stat", "none", [
        (_by("run", f"kubetune_train_completed_steps{{{RUN}}}"), "{{run}} steps done"),
        (_by("run", f"kubetune_train_planned_steps{{{RUN}}}"), "{{run}} steps planned"),
        (_by("run", f"kubetune_train_eta_seconds{{{RUN}}}"), "{{run}} ETA"),
    ], width=8, overrides=[{"matcher": {"id": "byRegexp", "options": ".*ETA"},
                            "properties": [{"id": "unit", "value": "s"}]}], instant=True),
    Panel("Quantization layers", "stat", "none", [
        (_by("run", f"kubetune_quantize_completed_layers{{{RUN}}}"), "{{run}} layers done"),
        (_by("run", f"kubetune_quantize_planned_layers{{{RUN}}}"), "{{run}} layers planned"),
    ], width=8, instant=True),
    Panel("Stage timeline", "state-timeline", "none", [(_timeline_expr(), "{{stage}}")],
          description="running → done (or interrupted, failed), per stage of the selected runs.", width=24, height=6,
          options={"mergeValues": True, "showValue": "never", "rowHeight": 0.8},
          field_config={"mappings": [{"type": "value", "options": {
              str(code): {"text": status, "color": {"running": "blue", "interrupted": "orange", "done": "green",
                                                    "failed": "red"}[status]}
              for status, code in STATUS_CODES.items()}}]}),
    Panel("Stage duration and peaks", "table", "none", [
        (_by("run, stage", f"kubetune_stage_duration_seconds{{{RUN}}}"), "duration"),
        (_by("run, stage", f"kubetune_gpu_process_memory_peak_bytes{{{RUN}}}"), "peak GPU memory"),
        (_by("run, stage", f"kubetune_stage_host_memory_peak_bytes{{{RUN}}}"), "peak host memory"),
    ], width=24, instant=True),
]


def dashboard() -> dict[str, Any]:
    panels, x, y, row_height = [], 0, 0, 0
    for i, p in enumerate(PANELS, start=1):
        if x + p.width > 24:
            x, y, row_height = 0, y + row_height, 0
        targets = [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                    **({"instant": True, "range": False} if p.instant else {})}
                   for j, (expr, legend) in enumerate(p.targets)]
        panel: dict[str, Any] = {
            "id": i, "type": p.kind, "title": p.title, "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": p.unit, **p.field_config}, "overrides": p.overrides},
            "options": p.options}
        if p.description:
            panel["description"] = p.description
        if p.kind == "table":
            panel["transformations"] = [{"id": "merge", "options": {}}]
        panels.append(panel)
        x += p.width
        row_height = max(row_height, p.height)
    return {
        "uid": DASHBOARD_UID, "title": "kubetune: stages", "tags": ["kubetune", "gpu", "llm"],
        "description": "GPU memory, training and quantization progress of kubetune stages (docs/monitoring.md).",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "run", "type": "query", "label": "Run", "datasource": DATASOURCE,
             "query": {"query": "label_values(kubetune_stage_info, run)", "refId": "run"},
             "definition": "label_values(kubetune_stage_info, run)", "refresh": 2, "multi": True,
             "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1},
        ]},
        "panels": panels,
    }


def alert_rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prometheus rule groups (the rule-file format). ``values`` replace DEFAULT_ALERTS (numbers or placeholders)."""
    v = {**DEFAULT_ALERTS, **(values or {})}
    return {"groups": [{"name": "kubetune", "rules": [
        {"alert": "KubetuneGpuMemoryNearlyFull",
         "expr": f"max by (run, stage, gpu) (kubetune_gpu_memory_used_bytes / kubetune_gpu_memory_total_bytes) "
                 f"> {v['gpuMemoryRatio']}",
         "for": v["gpuMemoryFor"],
         "labels": {"severity": "warning"},
         "annotations": {
             "summary": "GPU {{ $labels.gpu }} of {{ $labels.run }}/{{ $labels.stage }} is nearly full",
             "description": "GPU memory in use is {{ $value | humanizePercentage }} of capacity: the stage may run "
                            "out of memory (lower the batch size, or turn on gradient checkpointing)."}},
        {"alert": "KubetuneStageFailed",
         "expr": 'max by (run, stage) (kubetune_stage_status{status="failed"}) == 1',
         "labels": {"severity": "critical"},
         "annotations": {
             "summary": "Stage {{ $labels.stage }} of run {{ $labels.run }} failed",
             "description": "See `kubetune status {{ $labels.run }}` and `kubetune logs {{ $labels.run }} "
                            "--stage {{ $labels.stage }}`. Delete the stage's Pushgateway group to clear it."}},
        {"alert": "KubetuneTrainingStalled",
         "expr": "(time() - max by (run, stage) (kubetune_stage_last_progress_timestamp_seconds"
                 '{stage="finetune"})) '
                 f"> 60 * {v['stalledMinutes']}\n"
                 'and on (run, stage) max by (run, stage) (kubetune_stage_status{stage="finetune", '
                 'status="running"}) == 1',
         "labels": {"severity": "warning"},
         "annotations": {
             "summary": "Fine-tune of {{ $labels.run }} made no step for " + str(v["stalledMinutes"]) + " minutes",
             "description": "No optimizer step for {{ $value | humanizeDuration }} while the stage counts as "
                            "running: a hung data loader or NCCL call, or a pod killed before its final push."}},
    ]}]}


def monitoring_values_schema() -> dict[str, Any]:
    """JSON schema of the chart's ``monitoring`` values (kubetune.k8s.generate puts it in values.schema.json)."""
    def labels(what: str) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": {"type": "string"}, "description": what}

    def part(doc: str, selected_by: str, **extra: Any) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "description": doc,
                "properties": {"enabled": {"type": "boolean", "description": "Render it (with monitoring.enabled)."},
                               "labels": labels(f"Labels on it, e.g. what {selected_by} selects by."), **extra}}

    def duration(what: str) -> dict[str, Any]:
        return {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$", "description": what}

    return {"type": "object", "additionalProperties": False,
            "description": "PodMonitor, Grafana dashboard and alert rules (docs/monitoring.md).",
            "properties": {
                "enabled": {"type": "boolean", "description": "Needs the Prometheus Operator's CRDs."},
                "podMonitor": part("Scrape the stage pods' metrics port.", "Prometheus",
                                   interval=duration("Scrape interval: shorter shows short stages better and "
                                                     "costs more samples.")),
                "dashboard": part("Grafana dashboard ConfigMap for the sidecar; it covers every run, so enable it "
                                  "in one release per Grafana.", "Grafana's sidecar",
                                  annotations=labels("Annotations on the ConfigMap, e.g. grafana_folder.")),
                "alerts": part("PrometheusRule with kubetune's alerts; they cover every run, so enable them in one "
                               "release per Prometheus.", "Prometheus",
                               gpuMemoryRatio={"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                               "description": "KubetuneGpuMemoryNearlyFull fires above this share "
                                                              "of device memory used…"},
                               gpuMemoryFor=duration("…for this long."),
                               stalledMinutes={"type": "number", "exclusiveMinimum": 0,
                                               "description": "KubetuneTrainingStalled fires after this many "
                                                              "minutes without an optimizer step (model loading "
                                                              "counts)."})}}


# ---- files -----------------------------------------------------------------------------------------------------
def _yaml(obj: Any) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=200)


HEADER = "# Generated by `make monitoring` (python -m kubetune.metrics.assets); do not edit.\n"
COMPONENT = Path("k8s/components/monitoring")
CHART_FILES = Path("charts/kubetune/files/monitoring")


def prometheus_rule(name: str = "kubetune") -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetune",
                                                  "app.kubernetes.io/component": "monitoring"}},
            "spec": alert_rules()}


def files() -> dict[str, str]:
    """Repository-relative path -> the text it must hold."""
    board = json.dumps(dashboard(), indent=2) + "\n"
    return {
        str(CHART_FILES / "dashboard.json"): board,
        str(CHART_FILES / "rules.yaml"): HEADER + "# The chart replaces the KUBETUNE_* placeholders with "
                                                  "monitoring.alerts values.\n" + _yaml(alert_rules(PLACEHOLDERS)),
        str(COMPONENT / "dashboard.json"): board,
        str(COMPONENT / "prometheusrule.yaml"): HEADER + _yaml(prometheus_rule()),
    }


def main(argv: list[str], root: Path = Path(".")) -> int:
    return write_or_check(files(), argv, root, "monitoring")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
