"""The stage registry is the one place a stage is declared: a stage added there (with its own module, here outside
the kubetune package) is run by the runner, rendered as a Job, listed in the recipe schema and reported, with no
other file touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

STAGE_MODULE = '''
from kubetune.config import Section
from kubetune.stage_report import StageReport


class TallySettings(Section):
    """How the tally stage counts."""

    rows: int = 1


def run(ctx):
    (ctx.out / "tally.txt").write_text(f"{ctx.recipe.tally.rows}\\n")
    return {"tallied": ctx.recipe.tally.rows}


class TallyReport(StageReport):
    tallied: int

    def headline(self) -> str:
        return f"{self.tallied} rows tallied"

    def throughput_text(self) -> str:
        return f"{self.tallied} rows counted"
'''

# Runs in a fresh interpreter: a stage is registered before kubetune.config builds the recipe schema.
DRIVER = '''
import io, json
from pathlib import Path

from kubetune import registry

registry.register(registry.StageSpec("tally", "tally_stage", lambda recipe: [],
                                     resources={"gpus": 0, "cpu": "1", "memory": "1Gi"},
                                     report="tally_stage:TallyReport", settings="tally_stage:TallySettings"))

from click.testing import CliRunner
from rich.console import Console

from kubetune.cli import cli
from kubetune.config import Recipe, recipe_from_dict
from kubetune.k8s import render
from kubetune.report import build_report, to_markdown
from kubetune.runner import run_pipeline

root = Path("runs")  # relative: below the claim's mount path in a pod, below the working directory here
data = {"run": {"name": "plugged", "artifacts_root": str(root)}, "model": {"name_or_path": "org/model"},
        "stages": ["tally"], "tally": {"rows": 3}, "metrics": {"enabled": False}}
recipe = recipe_from_dict(data)
out = io.StringIO()
run_pipeline(recipe, console=Console(file=out, width=200))
job = render.stage_job(recipe, "tally", "ml")
Path("recipe.json").write_text(json.dumps(data))
schema = Recipe.model_json_schema()
print(json.dumps({
    "summary": out.getvalue(),
    "report_json": json.loads((root / "plugged" / "tally" / "report.json").read_text()),
    "job_args": job["spec"]["template"]["spec"]["containers"][0]["args"],
    "job_resources": job["spec"]["template"]["spec"]["containers"][0]["resources"],
    "stage_choices": schema["properties"]["stages"]["items"]["enum"],
    "resources_fields": sorted(schema["$defs"]["ResourcesSection"]["properties"]),
    "report_md": to_markdown(build_report([root / "plugged"], estimates=False)),
    "cli_stage": CliRunner().invoke(cli, ["stage", "tally", "--recipe", "recipe.json"]).output,
    "misspelt_setting": CliRunner().invoke(cli, ["validate", "recipe.json", "--set", "tally.rowz=2"]).output,
}))
'''


def test_a_stage_declared_in_the_registry_is_run_rendered_and_reported(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "tally_stage.py").write_text(STAGE_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), *sys.path])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    assert "tally" in seen["stage_choices"] and "tally" in seen["resources_fields"]
    assert "tally.rowz" in seen["misspelt_setting"]  # its own settings are a recipe section, typos refused
    assert seen["report_json"]["tallied"] == 3 and seen["report_json"]["stage"] == "tally"
    assert "peak_memory" in seen["report_json"]
    assert "3 rows tallied" in seen["summary"]  # the runner's summary shows the report model's headline
    assert seen["job_args"][:2] == ["stage", "tally"]
    assert seen["job_resources"]["requests"]["cpu"] == "1"  # the registry's default resources
    assert "## tally" in seen["report_md"] and "| 3 rows counted |" in seen["report_md"]
    assert "already done" in seen["cli_stage"]  # `kubetune stage tally` (what the Job runs) knows the stage
