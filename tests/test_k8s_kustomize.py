"""The kustomize base and the OpenShift overlay: `kubectl kustomize` output validates, the base is what
`kubetune render` makes of its recipe, and the overlay's recipe agrees with its patches."""

from __future__ import annotations

import pytest
import yaml

from k8s import tools
from k8s.checks import all_problems
from kubetune.config import load_recipe, recipe_from_dict
from kubetune.k8s import generate, render

pytestmark = pytest.mark.server
K8S = tools.ROOT / "k8s"


def kustomize(path) -> dict[tuple[str, str], dict]:
    out = tools.run("kubectl", "kustomize", str(path)).stdout
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}


def test_base_file_is_generated_from_its_recipe():
    name = "k8s/base/kubetune.yaml"
    assert (tools.ROOT / name).read_text() == generate.files(tools.ROOT)[name], "stale: run `make schema`"


def test_base_renders_what_submit_creates_and_validates():
    objects = kustomize(K8S / "base")
    recipe = load_recipe(K8S / "base" / "recipe.yaml")
    expected = {(o["kind"], o["metadata"]["name"]): o for o in render.base_objects(recipe, "default")}
    assert objects == expected
    assert all_problems(list(objects.values())) == []


def test_openshift_overlay_validates_and_its_recipe_matches_its_patches():
    objects = kustomize(K8S / "overlays" / "openshift")
    assert all_problems(list(objects.values()), openshift=True) == []
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"ml"}
    binding = objects["RoleBinding", "bloom-1b1-lora-driver"]
    assert binding["subjects"][0]["namespace"] == "ml"
    cm = objects["ConfigMap", "bloom-1b1-lora-recipe"]
    recipe = recipe_from_dict(yaml.safe_load(cm["data"]["recipe.yaml"]), "overlay recipe")
    driver = objects["Job", "bloom-1b1-lora-driver"]["spec"]["template"]["spec"]["containers"][0]
    assert driver["image"] == recipe.kubernetes.image  # the driver and the stage Jobs it makes run one image
    pvc = objects["PersistentVolumeClaim", "bloom-1b1-lora-data"]["spec"]
    assert pvc["accessModes"] == recipe.kubernetes.pvc.access_modes
    assert pvc["storageClassName"] == recipe.kubernetes.pvc.storage_class
    stage_jobs = [render.stage_job(recipe, s, "ml") for s in recipe.stages]
    assert all_problems(stage_jobs, openshift=True) == []  # the overlay's recipe sets no fsGroup either
