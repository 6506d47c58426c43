"""Hostile recipe strings through the Helm chart and `kubetune render` (issue 17, class 2).

Every string a recipe or the values can hold (newlines, " #", ": ", quotes, YAML indicators, unicode) must reach
the chart's output as the same string: the objects `helm template` makes must equal those of `kubetune render`
for the same recipe, and the UI (chart-only) must carry the strings unchanged. An unquoted value in a template
shows up here as a different object, an extra key (`hostNetwork: true` from a newline) or YAML that no longer
parses.

One `helm template` call renders a whole batch: a parent chart with the kubetune chart as a dependency under
one alias per recipe (each alias a release of its own values), so the test stays at a few helm calls.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from k8s import tools
from kubetune.cli import cli
from kubetune.config import DNS_SUBDOMAIN, LABEL_VALUE, QUANTITY, recipe_from_dict

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
CHART = tools.ROOT / "charts" / "kubetune"
BATCH = 8
# YAML's indicators and separators, line breaks, and any printable unicode (no surrogates or control characters:
# YAML cannot hold those raw, and the recipe file could not either)
INDICATORS = list("\n\r\t #:-?,[]{}&*!|>'\"%@`\\") + [": ", " #", "\n- ", "---", "...", "\u2028", "\ufeff"]
hostile = st.lists(st.sampled_from(INDICATORS) | st.characters(codec="utf-8",
                                                                exclude_categories=("Cs", "Cc", "Cn", "Co")),
                   min_size=1, max_size=12).map("".join)
# Strings that become Kubernetes names, label values or quantities: the recipe schema (and so the chart's values
# schema) holds them to the API server's own patterns, so the hostile ones among them are what those patterns allow.
dns_name = st.from_regex(DNS_SUBDOMAIN, fullmatch=True).filter(lambda s: len(s) <= 253)
label_value = st.from_regex(LABEL_VALUE, fullmatch=True).filter(lambda s: 0 < len(s) <= 63)
quantity = st.from_regex(QUANTITY, fullmatch=True).filter(lambda s: len(s) <= 64)
# an image reference has no whitespace or control characters; a mount path no ':' either
image = hostile.map(lambda s: "".join(c for c in s if not c.isspace() and c.isprintable()) or "img")
mount_path = hostile.map(lambda s: "/" + "".join(c for c in s if c != ":" and c.isprintable()))


@st.composite
def hostile_values(draw) -> dict:
    """Chart values whose every free-form string (recipe and UI) is hostile."""
    h = lambda: draw(hostile)  # noqa: E731
    name = lambda: draw(dns_name)  # noqa: E731
    recipe = {
        "model": {"name_or_path": h()},
        "prompt": {"template": h().replace("{", "{{").replace("}", "}}") + "{question}"},
        "run": {"artifacts_root": "a" + h()},  # relative: the same path under any mount_path
        "kubernetes": {
            "image": draw(image), "image_pull_secrets": [name(), name()], "queue": draw(label_value),
            "priority_class_name": name(),
            "pod_annotations": {"example.com/note": h()},
            "env": [{"name": "HOSTILE", "value": h()}],
            "pvc": {"mount_path": draw(mount_path), "claim_name": name(), "size": draw(quantity),
                    "storage_class": name(), "access_modes": ["ReadWriteMany"]},  # the driver mounts the claim too
            "driver": {"cpu": draw(quantity), "memory": draw(quantity)},
        },
    }
    ui = {"enabled": True, "authSecret": h(),
          "ingress": {"enabled": True, "host": h(), "className": h(), "tlsSecret": h()}}
    return {"recipe": recipe, "ui": ui}


KNOWN = {  # the injections issue 17 found in the chart before its values were quoted
    "recipe": {"model": {"name_or_path": "m"}, "kubernetes": {
        "image_pull_secrets": ["regcred"], "pvc": {"mount_path": "/work #space", "access_modes": ["ReadWriteMany"]}}},
    "ui": {"enabled": True, "authSecret": "login\n          hostNetwork: true"},
}
# ... and the one that no longer reaches a template: a Secret's name cannot hold a newline
INJECTED_SECRET = "regcred\n      hostNetwork: true\n      hostPID: true"


def yaml_text(data: dict) -> str:
    """JSON (which is YAML) with unicode as is, except the characters that YAML 1.1 parsers (libyaml, go-yaml,
    PyYAML) take as line breaks or a byte-order mark even inside quotes: escaped, they stay the string's own."""
    text = json.dumps(data, ensure_ascii=False)
    for char in ("\u2028", "\u2029", "\ufeff"):
        text = text.replace(char, char.encode("unicode_escape").decode())
    return text


def helm_batch(tmp: Path, batch: list[dict]) -> dict[str, list[dict]]:
    """Render each values set as its own release of the chart in one helm call: run name -> its objects."""
    parent = tmp / "batch"
    if not parent.exists():
        shutil.copytree(CHART, parent / "charts" / "kubetune")
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "batch", "version": "0.0.1",
        "dependencies": [{"name": "kubetune", "version": "*", "alias": f"r{i}"} for i in range(len(batch))]}))
    (parent / "values.yaml").write_text(yaml_text({f"r{i}": v for i, v in enumerate(batch)}), encoding="utf-8")
    out = tools.run("helm", "template", "ft", str(parent), "--namespace", "ml").stdout
    by_run: dict[str, list[dict]] = {}
    for obj in yaml.safe_load_all(out):
        if obj:
            by_run.setdefault(obj["metadata"]["labels"]["kubetune.io/run"], []).append(obj)
    return by_run


def kubetune_render(tmp: Path, recipe: dict) -> list[dict]:
    path = tmp / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml_text(recipe), encoding="utf-8")
    result = CliRunner().invoke(cli, ["render", str(path), "--no-stage-jobs", "-n", "ml"])
    assert result.exit_code == 0, result.output
    return [o for o in yaml.safe_load_all(result.output) if o]


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def check_batch(tmp: Path, batch: list[dict]) -> None:
    for i, values in enumerate(batch):
        values["recipe"].setdefault("run", {})["name"] = f"h{i}"
    chart = helm_batch(tmp, batch)
    for values in batch:
        recipe, ui = recipe_from_dict(values["recipe"]), values["ui"]
        run, k = recipe.run.name, recipe.kubernetes
        objects = chart[run]
        ours = by_key([o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] != "ui"])
        theirs = by_key(kubetune_render(tmp, values["recipe"]))
        assert set(ours) == set(theirs)
        for key in theirs:
            assert ours[key] == theirs[key], f"{key} differs between the chart and kubetune render"
        # the UI is the chart's alone: the strings must arrive as they are, and add nothing
        ui_objects = by_key([o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "ui"])
        pod = ui_objects["Deployment", f"{run}-ui"]["spec"]["template"]["spec"]
        assert set(pod) == {"securityContext", "enableServiceLinks", "automountServiceAccountToken",
                            "imagePullSecrets", "containers", "volumes",
                            *(["priorityClassName"] if k.priority_class_name else [])}
        assert pod["imagePullSecrets"] == [{"name": s} for s in k.image_pull_secrets]
        [container] = pod["containers"]
        assert container["image"] == k.image and container["workingDir"] == k.pvc.mount_path
        assert {"name": "data", "mountPath": k.pvc.mount_path, "readOnly": True} in container["volumeMounts"]
        assert container["args"][:4] == ["ui", run, "--artifacts-root", recipe.run.artifacts_root]
        env = {e["name"]: e for e in container["env"]}
        assert env["KUBETUNE_UI_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == ui["authSecret"]
        assert [e for e in container["env"] if e["name"] == "HOSTILE"] == k.env
        ingress = ui["ingress"] if ui.get("ingress", {}).get("enabled") else None
        if ingress:
            spec = ui_objects["Ingress", f"{run}-ui"]["spec"]
            assert spec["rules"][0]["host"] == ingress["host"]
            assert spec["ingressClassName"] == ingress["className"]
            assert spec["tls"] == [{"secretName": ingress["tlsSecret"], "hosts": [ingress["host"]]}]


def test_the_injections_found_in_issue_17_render_as_plain_strings(tmp_path):
    check_batch(tmp_path, [json.loads(json.dumps(KNOWN))])


def test_a_secret_name_with_a_newline_is_refused_by_the_chart_and_by_kubetune(tmp_path):
    values = {"recipe": {"run": {"name": "h0"}, "model": {"name_or_path": "m"},
                         "kubernetes": {"image_pull_secrets": [INJECTED_SECRET]}}}
    (tmp_path / "values.json").write_text(yaml_text(values), encoding="utf-8")
    chart = tools.run("helm", "template", "ft", str(CHART), "-f", str(tmp_path / "values.json"), check=False)
    assert chart.returncode != 0 and "/recipe/kubernetes/image_pull_secrets/0" in chart.stderr, chart.stderr
    path = tmp_path / "h0.yaml"
    path.write_text(yaml_text(values["recipe"]), encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 3 and "kubernetes.image_pull_secrets.0: String should match pattern" in result.output


@settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(hostile_values(), min_size=BATCH, max_size=BATCH))
def test_hostile_strings_render_the_same_through_helm_and_kubetune(tmp_path, batch):
    check_batch(tmp_path, batch)


ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
CONTROL = re.compile(r"^(/\*|if\b|else\b|end\b|range\b|with\b|\$[\w.]*\s*:?=|include \"kubetune\.check)")
ENCODED = re.compile(r"^(quote|int|toJson\b.*)$")  # a pipeline's last step that makes one safe scalar
BLOCK = re.compile(r"^n?indent \d+$")  # must carry YAML already encoded: toYaml, or one of our includes
# Text spliced in whole, and why it is safe: generated files, and alert thresholds the values schema limits to
# numbers and a duration pattern (kubetune.metrics.assets)
SPLICED = {'.Files.Get "files/monitoring/dashboard.json" | nindent 4', "$rules | nindent 2"}


def test_every_value_a_template_prints_is_quoted_or_encoded():
    """The property test covers the fields it fills; this covers every output of every template, so that a new
    bare `{{ .value }}` fails here before it reaches a cluster."""
    bare = []
    for path in sorted((CHART / "templates").glob("*.yaml")):
        for match in ACTION.finditer(path.read_text()):
            expr = " ".join(match.group(1).split())
            if CONTROL.match(expr) or expr in SPLICED:
                continue
            steps = [step.strip() for step in expr.split("|")]
            if steps[0].startswith(("toYaml", "toJson")) or ENCODED.match(steps[-1]):
                continue
            if BLOCK.match(steps[-1]) and (steps[0].startswith(("toYaml", "include \"kubetune.")) or
                                           "toYaml" in steps[:-1]):
                continue
            bare.append(f"{path.name}: {{{{ {expr} }}}}")
    assert bare == [], "printed without quote/toYaml: " + "; ".join(bare)
