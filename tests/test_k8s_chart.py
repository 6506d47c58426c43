"""The Helm chart: lint and template every ci/ scenario, validate what it renders, and hold it equal to
`kubetune render` for the same recipe: those objects' templates and the name/label helpers are generated from
render.py (kubetune.k8s.chartgen), so this guards the generator. The generated files must be what `make schema`
writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s import tools
from k8s.checks import all_problems
from kubetune import __version__
from kubetune.config import recipe_from_dict
from kubetune.k8s import chartgen, generate, render

pytestmark = pytest.mark.server
CHART = tools.ROOT / "charts" / "kubetune"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))


def helm_template(*args: str, check: bool = True):
    return tools.run("helm", "template", "ft", str(CHART), "--namespace", "ml", *args, check=check)


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if o}


def test_generated_files_are_current():
    for name, text in generate.files(tools.ROOT).items():
        if name.startswith("charts/"):
            assert (tools.ROOT / name).read_text() == text, f"{name} is stale: run `make schema`"


def test_chart_version_is_kubetune_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__
    default_image = generate.generated()["defaults"]["kubernetes"]["image"]
    assert default_image.endswith(f":{__version__}"), "the default image tag must follow the version"


def test_there_are_scenarios():
    assert {p.name for p in SCENARIOS} >= {"minimal-values.yaml", "openshift-values.yaml",
                                          "existing-claim-values.yaml"}


@pytest.mark.parametrize("values", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_lints_renders_valid_and_equals_kubetune_render(values: Path):
    lint = tools.run("helm", "lint", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in lint.stdout
    chart_objects = [o for o in yaml.safe_load_all(helm_template("-f", str(values)).stdout) if o]
    # an InferenceService is checked against KServe's CRD schema in tests/test_serve_k8s.py
    assert all_problems([o for o in chart_objects if o["kind"] != "InferenceService"],
                        openshift=values.stem.startswith("openshift")) == []

    recipe = recipe_from_dict(yaml.safe_load(values.read_text())["recipe"], str(values))
    expected = by_key(render.base_objects(recipe, "ml"))
    # the compare UI (values.ui) is the chart's alone: render has no UI; serving (values.serving) is
    # `kubetune render --serve`'s, compared in tests/test_serve_k8s.py
    got = by_key([o for o in chart_objects
                  if o["metadata"]["labels"].get("app.kubernetes.io/component") not in ("ui", "serve")])
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == expected[key], f"{key} differs between the chart and kubetune render"


def test_scenarios_render_each_switch_of_the_generated_templates_both_ways():
    """The equality test above guards the generated templates (kubetune.k8s.chartgen) only where the scenarios take
    each of their conditions both ways."""
    def value(recipe, path: str):
        for part in path.split("."):
            recipe = getattr(recipe, part)
        return recipe

    recipes = [recipe_from_dict(yaml.safe_load(p.read_text())["recipe"]) for p in SCENARIOS]
    units = (*chartgen.HELPERS, chartgen.DRIVER_JOB, *chartgen.OBJECTS.values())
    switches = {s for unit in units for s in (*unit.switches, unit.when) if s is not None}
    for switch in switches:
        on = [((value(r, switch.path) is not None) if switch.off is None else value(r, switch.path) != switch.off)
              and all(value(r, path) == v for path, v in switch.also.items()) for r in recipes]
        assert any(on) and not all(on), f"{switch.path}: no scenario in {CHART / 'ci'} renders it " + (
            "off" if all(on) else "on")


def test_values_schema_rejects_typos_and_a_missing_model():
    typo = helm_template("-f", str(CHART / "ci" / "minimal-values.yaml"), "--set", "recipe.finetune.lora.rr=1",
                         check=False)
    assert typo.returncode != 0 and "additional properties 'rr' not allowed" in typo.stderr
    bare = helm_template(check=False)
    assert bare.returncode != 0 and "missing property 'model'" in bare.stderr
    wrong_type = helm_template("-f", str(CHART / "ci" / "minimal-values.yaml"),
                               "--set", "recipe.kubernetes.backoff_limit=-1", check=False)
    assert wrong_type.returncode != 0 and "backoff_limit" in wrong_type.stderr


def test_values_schema_rejects_a_misspelt_gate_as_kubetune_validate_does():
    minimal = ("-f", str(CHART / "ci" / "minimal-values.yaml"))
    typo = helm_template(*minimal, "--set", "recipe.evaluate.gates.quantized_max_dorp=2", check=False)
    assert typo.returncode != 0 and "invalid propertyName 'quantized_max_dorp'" in typo.stderr
    on_a_set = helm_template(*minimal, "--set", "recipe.evaluate.sets.dev.source=dev.jsonl",
                             "--set", "recipe.evaluate.sets.dev.gates.merged_min_acuracy=70", check=False)
    assert on_a_set.returncode != 0 and "merged_min_acuracy" in on_a_set.stderr
    assert helm_template(*minimal, "--set", "recipe.evaluate.gates.quantized_max_drop=2").returncode == 0


def test_artifacts_outside_the_claim_fail_like_kubetune_render():
    result = helm_template("-f", str(CHART / "ci" / "minimal-values.yaml"),
                           "--set", "recipe.run.artifacts_root=/tmp/out", check=False)
    assert result.returncode != 0 and "outside recipe.kubernetes.pvc.mount_path" in result.stderr


def test_notes_print_the_commands_to_follow_the_run():
    result = tools.run("helm", "install", "ft", str(CHART), "--dry-run=client", "--namespace", "ml",
                       "-f", str(CHART / "ci" / "openshift-values.yaml"))
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubetune status bloom-7b1-qlora -n ml" in notes
    assert "kubetune logs bloom-7b1-qlora --stage finetune -f -n ml" in notes


def test_null_is_expressible_no_ttl_and_no_fs_group():
    """Issue 18: "no TTL" must be expressible in Helm; 0 is a TTL (the run's Jobs go as soon as it ends)."""
    def driver_spec(values: str) -> dict:
        objects = by_key(yaml.safe_load_all(helm_template("-f", str(CHART / "ci" / values)).stdout))
        return objects["Job", yaml.safe_load((CHART / "ci" / values).read_text())["recipe"]["run"]["name"] + "-driver"]["spec"]

    kept = driver_spec("existing-claim-values.yaml")  # ttl_after_finished_s: null
    assert "ttlSecondsAfterFinished" not in kept
    assert driver_spec("platform-values.yaml")["ttlSecondsAfterFinished"] == 0
    openshift = driver_spec("openshift-values.yaml")["template"]["spec"]["securityContext"]  # fs_group: null
    assert "fsGroup" not in openshift and openshift["fsGroupChangePolicy"] == "OnRootMismatch"


@pytest.mark.server
def test_notes_warn_when_the_image_is_kubetunes_unpublished_default():
    from kubetune.k8s.image import PROJECT_REPOSITORY

    def notes(*values: str) -> str:
        out = tools.run("helm", "install", "ft", str(CHART), "--dry-run=client", "--namespace", "ml",
                        "-f", str(CHART / "ci" / "minimal-values.yaml"), *values).stdout
        return out[out.index("NOTES:"):]

    assert f'hasPrefix "{PROJECT_REPOSITORY}"' in (CHART / "templates" / "NOTES.txt").read_text()
    default = notes()
    assert f"recipe.kubernetes.image is {PROJECT_REPOSITORY}:{__version__}, which has not been published" in default
    assert "make images IMAGE=REGISTRY/kubetune:TAG && podman push REGISTRY/kubetune:TAG" in default
    assert "has not been published" not in notes("--set", "recipe.kubernetes.image=registry.example.com/ml/kt:1")
