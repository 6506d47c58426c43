"""The Cloudera ML AMP (.project-metadata.yaml): valid against the AMP specification's fields (tests/amp names its
source), and what it runs is kubetune's pipeline: one CML job per stage of the default recipe's pipeline, in the
driver's order, GPUs as the recipe requests them, every stage after fetch offline, the scripts present, each job's
arguments a command that kubetune accepts, and the compare UI as the application on CML's port.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from kubetune.cli import cli
from kubetune.config import load_recipe
from kubetune.sources import pod_stages

ROOT = Path(__file__).resolve().parents[1]
AMP = yaml.safe_load((ROOT / ".project-metadata.yaml").read_text())
SCHEMA = json.loads((Path(__file__).parent / "amp" / "amp-spec.schema.json").read_text())


def tasks(kind: str) -> list[dict]:
    return [t for t in AMP["tasks"] if t["type"] == kind]


def default_of(variable: str) -> str:
    return AMP["environment_variables"][variable]["default"]


def test_the_amp_file_has_only_fields_of_the_specification():
    jsonschema.validate(AMP, SCHEMA)


@pytest.mark.parametrize("break_it", ["no author", "misspelt field", "job without script", "unknown task type",
                                      "undated format", "name too long"])
def test_the_field_rules_catch_what_cml_would_refuse(break_it):
    amp = copy.deepcopy(AMP)
    if break_it == "no author":
        del amp["author"]
    elif break_it == "misspelt field":
        amp["tasks"][1]["enviroment"] = amp["tasks"][1].pop("environment")
    elif break_it == "job without script":
        del tasks_of(amp, "create_job")[0]["script"]
    elif break_it == "unknown task type":
        amp["tasks"][0]["type"] = "run_notebook"
    elif break_it == "undated format":
        amp["date"] = "06/12/2026"
    else:
        amp["name"] = "k" * 201
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(amp, SCHEMA)


def tasks_of(amp: dict, kind: str) -> list[dict]:
    return [t for t in amp["tasks"] if t["type"] == kind]


def test_one_job_per_stage_of_the_pipeline_run_in_its_order_with_the_recipe_s_gpus():
    recipe = load_recipe(ROOT / default_of("KUBETUNE_RECIPE"), default_of("KUBETUNE_SET").split())
    stages = pod_stages(recipe)
    jobs = {t["entity_label"]: t for t in tasks("create_job")}
    ran = [t["entity_label"] for t in tasks("run_job")]
    assert ran == [f"kubetune_{s}" for s in stages]  # the AMP runs its tasks in order: fetch first
    assert set(ran) == set(jobs)
    for stage in stages:
        job = jobs[f"kubetune_{stage}"]
        assert shlex.split(job["arguments"]) == ["stage", stage]
        assert job["gpu"] == getattr(recipe.resources, stage).gpus, stage
        offline = {k: job["environment"].get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        assert offline == ({"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None} if stage == "fetch"
                           else {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}), stage
    assert not Path(recipe.run.artifacts_root).is_absolute()  # in the project's files, shared by every job


def test_every_script_exists_and_each_job_runs_a_command_kubetune_accepts():
    for task in AMP["tasks"]:
        if "script" in task:
            assert (ROOT / task["script"]).is_file(), task["script"]
    stage_command = cli.commands["stage"]
    for job in tasks("create_job"):
        args = shlex.split(job["arguments"]) + ["--recipe", default_of("KUBETUNE_RECIPE")]
        ctx = stage_command.make_context("stage", args[1:])  # parses as `kubetune stage …` would
        assert ctx.params["name"] == args[1]


def test_the_compare_ui_is_the_application_and_install_comes_first():
    assert AMP["tasks"][0]["type"] == "run_session" and AMP["tasks"][0]["script"] == "cml/install.py"
    (app,) = tasks("start_application")
    assert app["script"] == "cml/ui.py" and "\"ui\"" in (ROOT / app["script"]).read_text()
    assert AMP["tasks"].index(app) == len(AMP["tasks"]) - 1  # after the stages: it has models to compare
