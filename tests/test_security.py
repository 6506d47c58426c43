"""Security: the Hugging Face token never leaks, remote code and pickles stay off unless the recipe allows them,
only safetensors are written, and the driver's RBAC asks for nothing it does not use.

The token test is a canary: a unique string is put where the token really lives (the Secret in the cluster, the
HF_TOKEN variable of the process), then every place it must never reach is searched for it byte by byte: the
rendered objects (the recipe ConfigMap above all), every file the pipeline wrote, every log line and everything
printed, and the Prometheus exposition of every stage. Each search is first shown to find a planted copy, so a
search that cannot find anything fails instead of passing.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hostile_models import SENTINEL, build_pickle_model, build_remote_code_model
from k8s.fakeapi import FakeCluster
from kubetune import modelio
from kubetune.artifacts import RunLayout
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.errors import ModelError
from kubetune.k8s import render
from tiny import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[1]
CANARY = f"hf_CANARY{uuid.uuid4().hex}"
K8S = {"run": {"name": "sec"}, "model": {"name_or_path": "org/model"}, "stages": ["finetune", "merge"],
       "infer": {"models": ["base"]}, "kubernetes": {"hf_token_secret": {"name": "hf-token", "key": "token"},
                      "image": "registry.example.com/ml/kubetune:0.1.0"}}


def leaks(haystack: str | bytes | dict | list, needle: str = CANARY) -> bool:
    """Does ``needle`` occur in ``haystack`` as text, or base64-encoded (how Secrets carry values)?"""
    if isinstance(haystack, (dict, list)):
        haystack = json.dumps(haystack)
    data = haystack.encode() if isinstance(haystack, str) else haystack
    return any(form in data for form in (needle.encode(), base64.b64encode(needle.encode()).rstrip(b"=")[:-2]))


def leaking_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and leaks(p.read_bytes())]


def test_the_searches_find_a_planted_canary(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "report.json").write_bytes(b'{"x": "' + CANARY.encode() + b'"}')
    (tmp_path / "a" / "clean.txt").write_text("nothing here")
    assert leaking_files(tmp_path) == ["a/b/report.json"]
    assert leaks({"data": {"token": base64.b64encode(CANARY.encode()).decode()}})
    assert not leaks("hf_CANARY" + "0" * 32)


# ---- the token: rendered objects and the cluster ------------------------------------------------------------------
def test_token_never_in_rendered_objects(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", CANARY)
    recipe = recipe_from_dict(K8S)
    objects = render.render(recipe, "ml")
    assert not leaks(objects) and not leaks(render.to_yaml(objects))
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    assert not leaks(configmap["data"][render.RECIPE_FILE])
    for job in (o for o in objects if o["kind"] == "Job" and render.LABEL_STAGE in o["metadata"]["labels"]):
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "value" not in env["HF_TOKEN"]  # only a reference to the Secret travels
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    path = tmp_path / "sec.yaml"
    path.write_text(yaml.safe_dump(K8S))
    printed = CliRunner().invoke(cli, ["render", str(path)])
    assert printed.exit_code == 0 and "kind: ConfigMap" in printed.output and not leaks(printed.output)


def test_token_never_leaves_its_secret_in_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    path = tmp_path / "sec.yaml"
    path.write_text(yaml.safe_dump(K8S))
    with FakeCluster("ml") as fake:
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": "ml"},
                  "type": "Opaque", "data": {"token": base64.b64encode(CANARY.encode()).decode()}}
        fake._run(lambda: fake.kube.objects.__setitem__(("v1/secrets", "ml", "hf-token"), secret))
        kc = str(fake.kubeconfig(tmp_path / "kc", namespace="ml"))
        result = CliRunner().invoke(cli, ["submit", str(path), "--stage", "finetune", "--kubeconfig", kc])
        assert result.exit_code == 0, result.output
        created = [fake.objects(kind) for kind in ("Job", "ConfigMap", "PersistentVolumeClaim")]
        assert created[0] and created[1]
        assert not leaks(created) and not leaks(result.output)
        assert leaks(fake._run(lambda: fake.kube.objects["v1/secrets", "ml", "hf-token"].raw))  # the search works
        assert not [r for r in fake.requests() if "secrets" in str(r.url.path)]  # kubetune never reads Secrets


# ---- the token, remote code off, safetensors only: one real pipeline ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """The whole tiny pipeline through `kubetune -vv run`, with the canary in HF_TOKEN and /metrics served: returns
    (artifacts root, everything logged and printed, the /metrics exposition of each stage)."""
    from prometheus_client import generate_latest

    from kubetune.metrics.exporter import StageMonitor

    tmp = tmp_path_factory.mktemp("security")
    data = tiny_recipe_dict(tiny_model_dir, tmp / "artifacts", metrics={"local": True, "port": _free_port()},
                            kubernetes={"hf_token_secret": {"name": "hf-token"}})
    recipe_file = tmp / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    exposition: dict[str, str] = {}
    original_exit = StageMonitor.__exit__

    def record(self, *exc):
        if self.registry is not None:
            exposition[self.stage] = generate_latest(self.registry).decode()
        return original_exit(self, *exc)

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("HF_TOKEN", CANARY)
        mp.setenv("HUGGING_FACE_HUB_TOKEN", CANARY)
        mp.setattr(StageMonitor, "__exit__", record)
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        result = CliRunner().invoke(cli, ["-vv", "run", str(recipe_file)], catch_exceptions=False)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        mp.undo()
    assert result.exit_code == 0, result.output
    return tmp / "artifacts", "\n".join(records) + "\n" + result.output, exposition, recipe_from_dict(data)


def test_token_never_in_artifacts_logs_reports_or_metrics(pipeline):
    root, logs, exposition, recipe = pipeline
    assert set(exposition) == set(recipe.stages) and all("kubetune_" in text for text in exposition.values())
    assert len(logs.splitlines()) > 50 and "finetune step" in logs  # DEBUG logs of every stage were kept
    assert {p.parent.name for p in root.rglob("report.json")} == set(recipe.stages)
    assert leaking_files(root) == []
    assert not leaks(logs)
    assert not leaks(exposition)
    labels = {label for text in exposition.values() for label in
              (line.split("{", 1)[1].rsplit("}", 1)[0] for line in text.splitlines() if "{" in line and line[0] != "#")}
    assert labels and not any(leaks(label) for label in labels)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The Trainer's own resume state, in .work/ only (and in .trash/ when an incomplete checkpoint is moved aside):
# never a stage artifact, never loaded by anything but the Trainer, which loads it with torch.load(weights_only=True).
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


def pickled(path: Path) -> bool:
    """A pickle (protocol 2+ starts with 0x80) or a torch.save zip archive, whatever the file is called."""
    head = path.read_bytes()[:4]
    return head[:1] == b"\x80" or (head == b"PK\x03\x04" and path.suffix != ".zip")


def allowed_pickle(path: Path, run_dir: Path) -> bool:
    parts = path.relative_to(run_dir).parts
    return (parts[0] in (".work", ".trash") and path.name in TRAINER_STATE
            and any(p.startswith("checkpoint-") for p in parts))


def test_only_safetensors_are_written(pipeline):
    root, _, _, recipe = pipeline
    run_dir = RunLayout.from_recipe(recipe).run_dir
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    offenders = [str(p.relative_to(run_dir)) for p in files
                 if (p.suffix in PICKLE_SUFFIXES or pickled(p)) and not allowed_pickle(p, run_dir)]
    assert offenders == []
    for stage in ("finetune", "merge", "quantize"):  # the weights are there, as safetensors
        assert list((run_dir / stage).glob("*.safetensors")), stage
    exempt = [p for p in files if allowed_pickle(p, run_dir)]
    assert {p.name for p in exempt} == TRAINER_STATE  # the exemption is used, and only for these
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for p in exempt:
        if p.name != "training_args.bin":  # the Trainer never loads training_args.bin back
            with safe_globals():  # what resuming does: tensors, plain containers and numpy RNG arrays only
                torch.load(p, weights_only=True)
    assert not pickled(run_dir / "finetune" / "adapter_model.safetensors")
    bad = run_dir / "finetune" / "extra.bin"  # the check itself: a pickle in an artifact is caught
    torch.save({"x": torch.zeros(1)}, bad)
    try:
        assert pickled(bad) and not allowed_pickle(bad, run_dir)
    finally:
        bad.unlink()


# ---- remote code and pickles: off unless the recipe says so ----------------------------------------------------------
def test_trust_remote_code_is_off_by_default_and_not_rendered():
    recipe = recipe_from_dict({"model": {"name_or_path": "org/model"}})
    assert recipe.model.trust_remote_code is False and recipe.model.allow_pickle is False
    assert "trust_remote_code" not in render.recipe_text(recipe) and "allow_pickle" not in render.recipe_text(recipe)


def test_remote_code_refused_then_runs_only_when_allowed_with_a_warning(tiny_model_dir, tmp_path, caplog):
    sentinel = tmp_path / SENTINEL
    folder = build_remote_code_model(tiny_model_dir, tmp_path / "remote", sentinel)
    off = recipe_from_dict({"model": {"name_or_path": str(folder), "dtype": "float32"}})
    with pytest.raises(ModelError, match="model.trust_remote_code"):
        modelio.load_base_model(off.model)
    assert not sentinel.exists()
    assert not [r for r in caplog.records if "trust_remote_code is on" in r.getMessage()]

    on = recipe_from_dict({"model": {"name_or_path": str(folder), "dtype": "float32", "trust_remote_code": True}})
    with caplog.at_level(logging.WARNING, logger="kubetune"):
        model = modelio.load_base_model(on.model)
    assert type(model).__name__ == "KubetuneCustomModel" and sentinel.exists()
    warnings = [r.getMessage() for r in caplog.records if "trust_remote_code is on" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0]


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = build_pickle_model(tiny_model_dir, tmp_path / "pickle")
    refused = recipe_from_dict({"model": {"name_or_path": str(folder), "dtype": "float32"}})
    with pytest.raises(ModelError, match=r"only as pickle files \(pytorch_model.bin\).*model.allow_pickle: true"):
        modelio.load_base_model(refused.model)
    allowed = recipe_from_dict({"model": {"name_or_path": str(folder), "dtype": "float32", "allow_pickle": True}})
    assert modelio.load_base_model(allowed.model).num_parameters() > 0
    # allowing a pickle changes how weights load, not what they are: finished stages stay valid
    assert all(refused.fingerprint(s) == allowed.fingerprint(s) for s in refused.stages)


def test_hub_models_load_from_safetensors_only_unless_allowed(monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"Error no file named model.safetensors found in directory {name}.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ModelError, match="has no safetensors weights .*model.allow_pickle: true"):
        modelio.load_base_model(recipe_from_dict({"model": {"name_or_path": "org/pickled"}}).model)
    with pytest.raises(ModelError):
        modelio.load_base_model(recipe_from_dict({"model": {"name_or_path": "org/pickled", "allow_pickle": True}}).model)
    assert calls[0]["use_safetensors"] is True and "use_safetensors" not in calls[1]


# ---- RBAC -----------------------------------------------------------------------------------------------------------
def rbac_problems(rules: list[dict]) -> list[str]:
    problems = []
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            if any("*" in str(v) for v in rule.get(key) or []):
                problems.append(f"wildcard in {key}: {rule}")
        if any(r.split("/")[0] == "secrets" for r in rule.get("resources") or []):
            problems.append(f"secrets access: {rule}")
    return problems


def test_rbac_checker_catches_wildcards_and_secrets():
    assert len(rbac_problems([{"apiGroups": ["*"], "resources": ["secrets"], "verbs": ["get"]}])) == 2
    assert rbac_problems([{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}])


def test_rbac_has_no_wildcard_and_no_secrets():
    recipe = recipe_from_dict(K8S)
    objects = render.render(recipe, "ml")
    kinds = [o["kind"] for o in objects]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    roles = [o for o in objects if o["kind"] == "Role"]
    assert roles and all(not rbac_problems(r["rules"]) for r in roles)
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["kind"] == "Role"  # namespaced: never bound to a ClusterRole
    for job in (o for o in objects if o["kind"] == "Job"):
        spec = job["spec"]["template"]["spec"]
        is_driver = job["metadata"]["labels"]["app.kubernetes.io/component"] == render.DRIVER
        # stage pods get no API token at all; only the driver's pod mounts its own service account's
        assert spec["automountServiceAccountToken"] is is_driver
        assert ("serviceAccountName" in spec) is is_driver
    # the shipped kustomize manifests (and any other YAML in k8s/) hold no broader role either
    shipped = [doc for path in sorted((ROOT / "k8s").rglob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
               if isinstance(doc, dict)]
    shipped_roles = [d for d in shipped if d.get("kind") in ("Role", "ClusterRole")]
    assert shipped_roles and not [p for d in shipped_roles for p in rbac_problems(d.get("rules") or [])]
    assert not [d for d in shipped if d.get("kind") in ("ClusterRole", "ClusterRoleBinding")]
