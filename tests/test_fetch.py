"""The fetch stage: a recipe's hub model and hub data set come onto the claim's caches in a CPU Job before the GPU
stages, which then run offline. There is no hub here: tests/hubfake.py serves a tiny model and a small data set on
127.0.0.1 through the endpoints huggingface_hub and datasets call, and HF_ENDPOINT points the real code at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubfake import FakeHub
from k8s.fakeapi import FakeCluster
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.errors import PERMANENT_EXIT_CODES, HubError
from kubetune.k8s import render
from kubetune.sources import hub_dataset, hub_model, on_claim, pod_stages
from tiny import build_tiny_model

KUBETUNE = Path(sys.executable).parent / "kubetune"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    model = build_tiny_model(root / "tiny-llama")
    data = root / "sql"
    data.mkdir()
    rows = [{"context": f"CREATE TABLE t{i} (a INT)", "question": f"all a of t{i}?", "answer": f"SELECT a FROM t{i}"}
            for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": model, "data": data}


def recipe_file(tmp_path: Path, **model) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"run": {"name": "f1"}, "model": {"name_or_path": "org/tiny-llama", **model},
                                "data": {"source": "org/sql", "eval_size": 4}, "metrics": {"enabled": False}}))
    return path


def stage(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`kubetune stage …` as the fetch pod runs it: online (conftest makes the test process offline)."""
    online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    return subprocess.run([str(KUBETUNE), "stage", *args], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HOME": str(tmp_path / ".cache" / "huggingface"), **online, **env})


def test_hub_ids_and_paths_are_told_apart_from_the_text_alone():
    assert hub_model("bigscience/bloom-1b1") == "bigscience/bloom-1b1" and hub_model("gpt2") == "gpt2"
    for path in (".cache/models/x", "/data/models/x", "~/m", "../shared/m", "models/gemma/270m"):
        assert hub_model(path) is None, path
    assert hub_dataset("b-mc2/sql-create-context") == "b-mc2/sql-create-context"
    for source in ("builtin:text2sql", "data/train.jsonl", "rows.csv", "./folder"):
        assert hub_dataset(source) is None, source
    assert on_claim(".cache/models/x", "/workspace") == ".cache/models/x"
    assert on_claim("/workspace/inputs/m", "/workspace/") == "inputs/m"
    assert on_claim("../shared/m", "/workspace") is None and on_claim("/data/m", "/workspace") is None
    assert on_claim("~/m", "/workspace") is None


def test_fetch_fills_the_cache_records_the_commits_and_the_stages_then_read_it_offline(tmp_path, hub_files):
    with FakeHub({"model": {"org/tiny-llama": hub_files["model"]}, "dataset": {"org/sql": hub_files["data"]}}) as hub:
        done = stage(tmp_path, "fetch", "--recipe", str(recipe_file(tmp_path)), env={"HF_ENDPOINT": hub.url})
        assert done.returncode == 0, done.stderr
        commits = {kind: repo.commit for (kind, _), repo in hub.repos.items()}
    report = json.loads((tmp_path / "artifacts" / "f1" / "fetch" / "report.json").read_text())
    model, data = report["sources"]["model"], report["sources"]["data"]
    assert (model["repo_id"], model["revision"], model["commit"]) == ("org/tiny-llama", "main", commits["model"])
    assert model["files"] == 5 and model["bytes"] > 0
    assert (data["repo_id"], data["commit"], data["rows"]) == ("org/sql", commits["dataset"], 40)
    # The hub is gone now. What the GPU stages load, with the offline variables their pods get, comes from the cache.
    offline = subprocess.run(
        [sys.executable, "-c", "from kubetune.config import load_recipe; from kubetune.data import load_splits; "
         "from kubetune.modelio import load_base_model; r = load_recipe('recipe.yaml'); "
         "print(len(load_splits(r.data).train), type(load_base_model(r.model)).__name__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "HF_HOME": str(tmp_path / ".cache" / "huggingface"), "HF_ENDPOINT": hub.url,
             **{e["name"]: e["value"] for e in render.OFFLINE_ENV}})
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert offline.stdout.split()[-2:] == ["36", "LlamaForCausalLM"]


def test_a_revision_the_hub_lacks_fails_for_good_and_an_unreachable_hub_is_retried(tmp_path, hub_files):
    with FakeHub({"model": {"org/tiny-llama": hub_files["model"]}, "dataset": {"org/sql": hub_files["data"]}}) as hub:
        missing = stage(tmp_path, "fetch", "--recipe", str(recipe_file(tmp_path, revision="v9")),
                        env={"HF_ENDPOINT": hub.url})
    assert missing.returncode == 5, missing.stderr  # ModelError: permanent, the Job fails at once
    assert "model.name_or_path: org/tiny-llama: the hub has no such revision" in missing.stderr
    assert "Traceback" not in missing.stderr
    gone = stage(tmp_path, "fetch", "--recipe", str(recipe_file(tmp_path)), env={"HF_ENDPOINT": hub.url})
    assert gone.returncode == HubError.exit_code and "the hub could not be read" in gone.stderr, gone.stderr
    assert HubError.exit_code not in PERMANENT_EXIT_CODES  # the Job retries it
    assert "Traceback" not in gone.stderr


def test_the_pipeline_fetches_first_on_the_cpu_and_every_later_stage_runs_offline():
    recipe = recipe_from_dict({"run": {"name": "f1"}, "model": {"name_or_path": "org/tiny-llama"}})
    assert pod_stages(recipe) == ["fetch", *recipe.stages]
    jobs = {o["metadata"]["labels"][render.LABEL_STAGE]: o for o in render.render(recipe, "ml")
            if o["kind"] == "Job" and render.LABEL_STAGE in o["metadata"]["labels"]}
    assert list(jobs) == pod_stages(recipe)
    fetch = jobs["fetch"]["spec"]["template"]["spec"]["containers"][0]
    assert fetch["args"][:2] == ["stage", "fetch"] and "nvidia.com/gpu" not in fetch["resources"]["limits"]
    assert not {e["name"] for e in fetch["env"]} & {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}
    for name in recipe.stages:
        env = {e["name"]: e.get("value") for e in jobs[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1", name
    local = recipe_from_dict({"run": {"name": "f1"}, "model": {"name_or_path": ".cache/models/m"}})
    assert pod_stages(local) == list(local.stages)  # nothing on the hub: nothing to fetch, nothing made offline
    assert "HF_HUB_OFFLINE" not in str(render.render(local, "ml"))


@pytest.mark.parametrize("field,value", [("model.name_or_path", "../shared/models/m"),
                                         ("data.source", "/data/rows.jsonl"), ("model.name_or_path", "~/m")])
def test_submit_refuses_a_path_off_the_claim_before_creating_anything(tmp_path, field, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {name: f1}\nmodel: {name_or_path: org/m}\n")
    with FakeCluster("ml") as fake:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        result = CliRunner().invoke(cli, ["submit", str(recipe), "--set", f"{field}={value}",
                                          "--kubeconfig", str(kubeconfig)])
        assert result.exit_code == 3, result.output
        assert f"{field}: {value} is not on the claim (mounted at /workspace)" in result.output
        assert f"kubetune stage-in {value} --to inputs/" in result.output and f"set {field}=inputs/" in result.output
        assert fake.requests() == []  # refused before the first API call
