"""Writes the OpenAPI (JSON Schema) of the TrainJob and PyTorchJob CRDs that the render tests validate against.

Neither CRD's YAML is published on PyPI, npm or Debian (no internet otherwise here), so the schemas are written
from the official SDKs' models, which are generated from the same Go types as the CRDs:

- kubeflow-trainer-api 2.3.0 (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1): pydantic models;
  ``TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)``, pod fields included (the package carries its
  own io.k8s models).
- kubeflow-training 1.9.4 (Training Operator v1, kubeflow.org/v1): openapi-generator classes, read from their
  ``openapi_types``/``attribute_map`` without importing the package (its ``__init__`` wants a cluster); the
  Kubernetes types they name (V1PodTemplateSpec…) come from the ``kubernetes`` client's models the same way.

Every object is closed (``additionalProperties: false``) as a CRD's structural schema is, so a misspelt field
fails. ``status`` is left out: kubetune never writes it. Regenerate:

    pip download --no-deps kubeflow-trainer-api==2.3.0 kubeflow-training==1.9.4 -d /tmp/kf
    python tests/schemas/from_sdk_models.py /tmp/kf
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TRAINJOB_FILE = HERE / "kubeflow-trainjob-v1alpha1.json"
PYTORCHJOB_FILE = HERE / "kubeflow-pytorchjob-v1.json"


def _close(schema: Any) -> Any:
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _close(value)
    elif isinstance(schema, list):
        for value in schema:
            _close(value)
    return schema


def trainjob_schema(wheels: Path) -> dict[str, Any]:
    wheel = next(wheels.glob("kubeflow_trainer_api-2.3.0-*.whl"))
    target = wheels / "trainer-api"
    zipfile.ZipFile(wheel).extractall(target)
    sys.path.insert(0, str(target))
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    schema = TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)
    schema["properties"].pop("status", None)
    for name, definition in schema["$defs"].items():
        # openapi-generator's oneOf wrappers (Quantity, IntOrString) hold the value in ``actual_instance``: on the
        # wire they are the bare value
        if "actual_instance" in definition.get("properties", {}):
            choices = definition["properties"]["actual_instance"]["anyOf"]
            schema["$defs"][name] = {"anyOf": [c for c in choices if c.get("type") != "null"]}
    return _close(schema)


class OpenApiClasses:
    """openapi-generator model classes, read from source: name → (openapi_types, attribute_map)."""

    def __init__(self):
        self.classes: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self.unresolved: set[str] = set()

    def read(self, folder: Path) -> "OpenApiClasses":
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    found = {}
                    for a in node.body:  # `name = {...}` or, in newer clients, `name: ClassVar[...] = {...}`
                        targets = a.targets if isinstance(a, ast.Assign) else [a.target] \
                            if isinstance(a, ast.AnnAssign) and a.value is not None else []
                        for t in targets:
                            if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map"):
                                found[t.id] = ast.literal_eval(a.value)
                    if len(found) == 2:
                        self.classes[node.name] = (found["openapi_types"], found["attribute_map"])
        return self

    def schema(self, root: str) -> dict[str, Any]:
        defs: dict[str, Any] = {}

        def of(type_name: str) -> dict[str, Any]:
            array = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
            if array:
                return {"type": "array", "items": of(array.group(1))}
            match = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)
            if match:
                return {"type": "object", "additionalProperties": of(match.group(1) or match.group(2))}
            simple = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                      "float": {"type": "number"}, "datetime": {"type": "string"}, "date": {"type": "string"},
                      "object": {}}
            if type_name in simple:
                return dict(simple[type_name])
            if type_name in ("Quantity", "IntOrString"):  # bare values on the wire
                return {"anyOf": [{"type": "string"}, {"type": "number"}]}
            if type_name not in self.classes:  # e.g. K8sIoApiAutoscalingV2MetricSpec (elasticPolicy.metrics)
                self.unresolved.add(type_name)
                return {"description": f"unchecked: {type_name} is in neither SDK"}
            if type_name not in defs:
                defs[type_name] = {}  # recursion guard
                types, names = self.classes[type_name]
                defs[type_name] = {"type": "object", "additionalProperties": False,
                                   "properties": {names[attr]: of(t) for attr, t in types.items()}}
            return {"$ref": f"#/$defs/{type_name}"}

        top = of(root)
        schema = {"$defs": defs, **top}
        defs[root]["properties"].pop("status", None)
        return schema


def pytorchjob_schema(wheels: Path) -> dict[str, Any]:
    import kubernetes.client.models

    wheel = next(wheels.glob("kubeflow_training-1.9.4-*.whl"))
    target = wheels / "training"
    zipfile.ZipFile(wheel).extractall(target)
    classes = OpenApiClasses().read(target / "kubeflow" / "training" / "models")
    classes.read(Path(kubernetes.client.models.__file__).parent)
    schema = classes.schema("KubeflowOrgV1PyTorchJob")
    print(f"left open (in neither SDK): {sorted(classes.unresolved)}")
    return schema


def main() -> None:
    wheels = Path(sys.argv[1])
    for path, schema in ((TRAINJOB_FILE, trainjob_schema(wheels)), (PYTORCHJOB_FILE, pytorchjob_schema(wheels))):
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
