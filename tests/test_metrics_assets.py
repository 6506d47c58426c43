"""The monitoring assets: generated copies current, alert rules checked and unit-tested by promtool (each alert
firing and not firing: tests/metrics/alerts-test.yaml), the chart's monitoring templates (helm template) and
the kustomize component (kubectl kustomize) rendering what kubetune.metrics.assets declares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import require_binary
from k8s import tools
from kubetune.config import recipe_from_dict
from kubetune.k8s import render
from kubetune.metrics import assets

pytestmark = pytest.mark.server
ROOT = tools.ROOT
HERE = ROOT / "tests" / "metrics"


def test_generated_files_are_current():
    for name, text in assets.files().items():
        assert (ROOT / name).read_text() == text, f"{name} is stale: run `make monitoring`"


def test_dashboard_structure():
    board = assets.dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        assert p["targets"] and all(t["expr"] and t["datasource"] == assets.DATASOURCE for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    titles = " | ".join(p["title"] for p in board["panels"])
    for needed in ("GPU memory", "loss", "throughput", "timeline"):
        assert needed in titles
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "run"}


def _promtool_rules(tmp_path, rules: dict) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(HERE / "alerts-test.yaml", tmp_path / "alerts-test.yaml")


def promtool(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_and_unit_tests_the_alerts(tmp_path):
    _promtool_rules(tmp_path, assets.alert_rules())
    check = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0 and "SUCCESS: 3 rules found" in check.stdout, check.stdout + check.stderr
    test = promtool("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    # the unit tests can fail: at a 99 % threshold the 96 % case no longer fires
    _promtool_rules(tmp_path, assets.alert_rules({"gpuMemoryRatio": 0.99}))
    broken = promtool("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert broken.returncode != 0 and "KubetuneGpuMemoryNearlyFull" in broken.stdout + broken.stderr


def helm_template(*args: str) -> list[dict]:
    out = tools.run("helm", "template", "ft", str(ROOT / "charts" / "kubetune"), "--namespace", "ml",
                    "--set", "recipe.model.name_or_path=org/m", "--set", "recipe.run.name=r1", *args).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def test_chart_monitoring_off_by_default_and_complete_when_on():
    assert not [o for o in helm_template() if o["kind"] in ("PodMonitor", "PrometheusRule")
                or o["metadata"]["name"] == "kubetune-dashboard"]
    objs = {(o["kind"], o["metadata"]["name"]): o for o in helm_template(
        "--set", "monitoring.enabled=true", "--set", "monitoring.podMonitor.labels.release=kps")}
    monitor = objs["PodMonitor", "r1-stages"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # the PodMonitor selects this run's stage pods, by the port name that the stage Jobs declare
    recipe = recipe_from_dict({"run": {"name": "r1"}, "model": {"name_or_path": "org/m"}})
    pod = render.stage_job(recipe, "finetune", "ml")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports and ports["metrics"] == recipe.metrics.port
    other = render.stage_job(recipe_from_dict({"run": {"name": "r2"}, "model": {"name_or_path": "m"}}), "merge", "ml")
    other_labels = other["spec"]["template"]["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= other_labels.items()  # another run's pods

    board = objs["ConfigMap", "kubetune-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["kubetune.json"]) == assets.dashboard()
    assert objs["PrometheusRule", "kubetune"]["spec"] == assets.alert_rules()


def test_chart_alert_thresholds_come_from_values(tmp_path):
    values = tmp_path / "values.yaml"  # a file, not --set: helm's --set turns 0.9 into a string
    values.write_text(yaml.safe_dump({"monitoring": {"enabled": True, "alerts": {
        "stalledMinutes": 30, "gpuMemoryRatio": 0.9, "gpuMemoryFor": "5m"}}}))
    rule = next(o for o in helm_template("-f", str(values)) if o["kind"] == "PrometheusRule")
    expected = assets.alert_rules({"stalledMinutes": 30, "gpuMemoryRatio": 0.9, "gpuMemoryFor": "5m"})
    assert rule["spec"] == expected
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode == 0
    bad = tools.run("helm", "template", "ft", str(ROOT / "charts" / "kubetune"), "--set",
                    "recipe.model.name_or_path=m", "--set", "monitoring.alerts.gpuMemoryFor=soon", check=False)
    assert bad.returncode != 0 and "gpuMemoryFor" in bad.stderr


def test_kustomize_component(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "ml",
        "resources": [os.path.relpath(ROOT / "k8s" / "base", overlay)],  # kustomize refuses absolute paths
        "components": [os.path.relpath(ROOT / "k8s" / "components" / "monitoring", overlay)]}))
    out = tools.run("kubectl", "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)).stdout
    objs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    board = objs["ConfigMap", "kubetune-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1" and board["metadata"]["namespace"] == "ml"
    assert json.loads(board["data"]["kubetune.json"]) == assets.dashboard()
    assert objs["PrometheusRule", "kubetune"]["spec"] == assets.alert_rules()
    assert objs["PodMonitor", "kubetune-stages"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert ("Job", "bloom-1b1-lora-driver") in objs  # the base is still all there
