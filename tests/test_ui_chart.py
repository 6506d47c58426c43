"""The chart's compare UI (values.ui): off by default; when on, a Deployment that runs `kubetune ui` on the run
with the claim read-only and the restricted security context, its Service, and a Route or an Ingress.
(test_k8s_chart.py also lints, validates and Pod-Security-checks ci/ui-values.yaml with every scenario.)"""

from __future__ import annotations

import pytest
import yaml

from k8s import tools
from k8s.checks import all_problems, openshift_restricted_v2, pss_restricted

pytestmark = pytest.mark.server
CHART = tools.ROOT / "charts" / "kubetune"
UI_VALUES = CHART / "ci" / "ui-values.yaml"


def render(*args: str, check: bool = True):
    result = tools.run("helm", "template", "ft", str(CHART), "--namespace", "ml", *args, check=check)
    if not check:
        return result
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout) if o}


def test_ui_is_off_by_default():
    objects = render("-f", str(CHART / "ci" / "minimal-values.yaml"))
    assert not [key for key, o in objects.items() if o["metadata"]["labels"]["app.kubernetes.io/component"] == "ui"]


def test_ui_deployment_reads_the_run_read_only_and_is_restricted():
    objects = render("-f", str(UI_VALUES))
    deployment = objects[("Deployment", "bloom-1b1-lora-ui")]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["ui", "bloom-1b1-lora", "--artifacts-root", "/workspace/artifacts",
                                 "--host", "0.0.0.0", "--port", "7860"]
    claim = next(v for v in pod["volumes"] if v["name"] == "data")
    assert claim["persistentVolumeClaim"] == {"claimName": "bloom-1b1-lora-data", "readOnly": True}
    assert {"name": "data", "mountPath": "/workspace", "readOnly": True} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_UI_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "kubetune-ui-login", "key": "auth"}
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["HF_HOME"]["value"] == "/workspace/.cache/huggingface"
    assert pod["automountServiceAccountToken"] is False
    assert pss_restricted(deployment) == []
    # the Service selects exactly the Deployment's pods, and the Ingress points at the Service
    service = objects[("Service", "bloom-1b1-lora-ui")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ingress = objects[("Ingress", "bloom-1b1-lora-ui")]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "bloom-1b1-lora-ui", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "kubetune-ui-tls", "hosts": ["kubetune-ui.example.com"]}]
    assert all_problems([deployment, service, ingress]) == []


def test_ui_on_openshift_gets_a_route_with_a_login_and_runs_on_the_cpu():
    objects = render("-f", str(CHART / "ci" / "openshift-values.yaml"), "--set", "ui.enabled=true",
                     "--set", "ui.route.enabled=true", "--set", "ui.authSecret=ui-login", "--set", "ui.gpus=0")
    route = objects[("Route", "bloom-7b1-qlora-ui")]
    assert route["spec"]["to"] == {"kind": "Service", "name": "bloom-7b1-qlora-ui", "weight": 100}
    assert route["spec"]["tls"]["termination"] == "edge" and "host" not in route["spec"]
    deployment = objects[("Deployment", "bloom-7b1-qlora-ui")]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"name": "KUBETUNE_UI_AUTH", "valueFrom": {"secretKeyRef": {"name": "ui-login", "key": "auth"}}} in \
        container["env"]
    assert pod["imagePullSecrets"] == [{"name": "internal-registry"}]
    assert "runtimeClassName" not in pod and pod["tolerations"] == [  # the recipe's, not the GPU ones: no GPU
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert openshift_restricted_v2(deployment) == []


@pytest.mark.parametrize("exposure", ["route", "ingress"])
def test_no_route_or_ingress_without_a_login(exposure):
    refused = render("-f", str(CHART / "ci" / "minimal-values.yaml"), "--set", "ui.enabled=true",
                     "--set", f"ui.{exposure}.enabled=true", check=False)
    assert refused.returncode != 0 and "at '/ui/authSecret': minLength" in refused.stderr
    if exposure == "ingress":  # a controller's own login (nginx auth-url, oauth2-proxy), declared as such
        objects = render("-f", str(CHART / "ci" / "minimal-values.yaml"), "--set", "ui.enabled=true",
                         "--set", "ui.ingress.enabled=true", "--set", "ui.ingress.externalAuth=true")
        assert ("Ingress", "demo-ui") in objects


def test_ui_pod_gets_the_recipes_pod_knobs():
    objects = render("-f", str(UI_VALUES), "--set", "recipe.kubernetes.runtime_class_name=nvidia",
                     "--set", "recipe.kubernetes.priority_class_name=ml-batch",
                     "--set", "recipe.kubernetes.pod_labels.team=nlp",
                     "--set", "recipe.kubernetes.env[0].name=HF_ENDPOINT",
                     "--set", "recipe.kubernetes.env[0].value=https://hf-mirror.example.com")
    deployment = objects[("Deployment", "bloom-1b1-lora-ui")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "ml-batch"
    assert pod["securityContext"]["fsGroup"] == 1001
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "nlp"
    assert pod["containers"][0]["env"][-1] == {"name": "HF_ENDPOINT", "value": "https://hf-mirror.example.com"}
    assert all_problems([deployment]) == []


def test_ui_values_are_checked_by_the_schema():
    typo = render("-f", str(UI_VALUES), "--set", "ui.prot=80", check=False)
    assert typo.returncode != 0 and "additional properties 'prot' not allowed" in typo.stderr
    privileged = render("-f", str(UI_VALUES), "--set", "ui.port=80", check=False)
    assert privileged.returncode != 0 and "port" in privileged.stderr
