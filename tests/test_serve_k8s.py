"""Serving a finished run on a cluster: the KServe InferenceService (validated against KServe's own CRD schema,
vendored in tests/schemas/) or the Deployment + Service (kubernetes-validate, strict), Pod Security restricted,
GPUs from the recipe, readiness on /health, the model read from the claim, and the objects created through the
API (fake API server).

The schema file is KServe's CRD (config/crd/full/serving.kserve.io_inferenceservices.yaml, the commit named in
the file), v1beta1's openAPIV3Schema without its descriptions. Regenerate it from a checkout of kserve/kserve:
    python - <<'PY'
    import json, yaml
    crd = yaml.safe_load(open("config/crd/full/serving.kserve.io_inferenceservices.yaml"))
    ...  # versions[name=v1beta1].schema.openAPIV3Schema, every 'description' key dropped
    PY
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from k8s.checks import all_problems, pss_restricted, validate
from k8s.fakeapi import FakeCluster
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.k8s.serving import serving_objects
from kubetune.serving import chat_template

SCHEMA_FILE = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.json"
RECIPE = {"run": {"name": "sql", "artifacts_root": "/workspace/artifacts"}, "model": {"name_or_path": "org/m"},
          "prompt": {"template": "Q: {question}\nS: {context}\nA:"},
          "kubernetes": {"pvc": {"claim_name": "shared"}, "runtime_class_name": "nvidia",
                         "image": "registry.example/kubetune:1"},
          "serve": {"resources": {"gpus": 2, "gpu_type": "NVIDIA-H100-80GB-HBM3", "cpu": "8", "memory": "40Gi"}}}


def recipe(**serve):
    data = copy.deepcopy(RECIPE)
    data["serve"].update(serve)
    return recipe_from_dict(data)


def strict(schema):
    """Refuse unknown fields as `kubectl --validate=strict` does (a CRD schema alone would prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def isvc_validator():
    vendored = json.loads(SCHEMA_FILE.read_text())
    assert "kserve/kserve" in vendored["source"] and vendored["version"] == "v1beta1"
    schema = strict(vendored["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's, checked below by name
    return jsonschema.Draft7Validator(schema)


def isvc_problems(validator, obj) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_inference_service_matches_kserves_schema_and_reads_the_claim(isvc_validator):
    (isvc,) = serving_objects(recipe(), "ml", "quantized")
    assert isvc_problems(isvc_validator, isvc) == []
    assert isvc["metadata"]["name"] == "sql-quantized"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["storageUri"] == "pvc://shared/artifacts/sql/quantize"  # relative to the claim, not the mount
    assert model["modelFormat"] == {"name": "vLLM"} and model["runtime"] == "vllm-runtime"
    args = dict(zip(model["args"][::2], model["args"][1::2]))
    assert args["--served-model-name"] == "sql-quantized" and args["--chat-template"] == chat_template(
        RECIPE["prompt"]["template"])
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2" and model["resources"]["requests"]["cpu"] == "8"
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert predictor["runtimeClassName"] == "nvidia"
    assert model["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    # Pod Security restricted, read as the pod KServe makes of the predictor
    as_pod = {"kind": "Pod", "spec": {**{k: v for k, v in predictor.items() if k != "model"},
                                      "containers": [{"name": "kserve-container", **model}]}}
    assert pss_restricted(as_pod) == []


def test_the_schema_check_can_fail(isvc_validator):
    (isvc,) = serving_objects(recipe(), "ml", "merged")
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    problems = isvc_problems(isvc_validator, isvc)
    assert any("storageURI" in p for p in problems) and any("minReplicas" in p for p in problems)


@pytest.mark.parametrize("openshift", [False, True])
def test_deployment_and_service_validate_and_pass_restricted(openshift):
    overrides = {"fs_group": None} if openshift else {}
    data = copy.deepcopy(RECIPE)
    data["kubernetes"].update(overrides)
    data["serve"]["platform"] = "deployment"
    objects = serving_objects(recipe_from_dict(data), "ml", "merged")
    assert [o["kind"] for o in objects] == ["Deployment", "Service"]
    assert all_problems(objects, openshift=openshift) == []
    assert all(validate(o) == [] for o in objects)
    deploy, service = objects
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "/mnt/models/artifacts/sql/merge"
    assert {"name": "data", "mountPath": "/mnt/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared", "readOnly": True}} in pod["volumes"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert set(service["spec"]["selector"].items()) <= set(deploy["spec"]["template"]["metadata"]["labels"].items())


def test_submit_serve_creates_the_objects_through_the_api(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    with FakeCluster("ml") as fake:
        kubeconfig = str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))
        result = CliRunner().invoke(cli, ["submit", str(path), "--serve", "merged", "--kubeconfig", kubeconfig],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "created InferenceService ml/sql-merged" in result.output
        stored = fake.objects("InferenceService")["sql-merged"]
        assert stored["spec"] == serving_objects(recipe(), "ml", "merged")[0]["spec"]

        result = CliRunner().invoke(cli, ["submit", str(path), "--serve", "merged", "--kubeconfig", kubeconfig,
                                          "--set", "serve.platform=deployment"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert set(fake.objects("Deployment")) == set(fake.objects("Service")) == {"sql-merged"}


def test_render_serve_prints_the_same_objects(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    result = CliRunner().invoke(cli, ["render", str(path), "--serve", "quantized", "-n", "ml"],
                                catch_exceptions=False)
    assert list(yaml.safe_load_all(result.output)) == serving_objects(recipe(), "ml", "quantized")


CHART_SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "charts" / "kubetune" / "ci").glob("serve-*.yaml"))


@pytest.mark.server
@pytest.mark.parametrize("values", CHART_SCENARIOS, ids=[p.stem for p in CHART_SCENARIOS])
def test_chart_serves_as_kubetune_render_does(values, isvc_validator):
    from k8s import tools

    chart = values.parents[1]
    out = tools.run("helm", "template", "ft", str(chart), "--namespace", "ml", "-f", str(values)).stdout
    served = [o for o in yaml.safe_load_all(out)
              if o and o["metadata"]["labels"].get("app.kubernetes.io/component") == "serve"]
    data = yaml.safe_load(values.read_text())
    expected = serving_objects(recipe_from_dict(data["recipe"]), "ml", data["serving"].get("model") or None)
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731 (helm orders objects by kind)
    assert sorted(served, key=key) == sorted(expected, key=key)
    for obj in served:
        assert (isvc_problems(isvc_validator, obj) if obj["kind"] == "InferenceService"
                else validate(obj) + all_problems([obj], openshift=values.stem.endswith("deployment-values"))) == []
