"""Commands that work on this machine: validate a recipe, run the pipeline, score a model, serve a run."""

from __future__ import annotations

import sys

import click

from kubetune.cli import cli

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", envvar="KUBETUNE_SET",
    help="Override a recipe value, e.g. --set finetune.lora.r=8 (repeatable; value parsed as YAML; "
         "env KUBETUNE_SET takes several separated by spaces). `kubetune explain KEY.PATH` says what a key means.")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
def validate(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check RECIPES against the schema and print every problem; exit 3 if any recipe is invalid."""
    from kubetune.config import load_recipe
    from kubetune.errors import RecipeError
    from kubetune.k8s.embedded import check_embedded
    from kubetune.terminal import printable

    failed = 0
    for path in recipes:
        try:  # the objects the recipe hands to Kubernetes too: what validates here, the API server takes
            recipe = check_embedded(load_recipe(path, list(overrides)), path)
        except RecipeError as exc:
            failed += 1
            click.secho(f"✗ {printable(exc)}", fg="red", err=True)
        else:
            click.echo(f"✓ {printable(path)}: run '{recipe.run.name}', stages {', '.join(recipe.stages)}")
    if failed:
        sys.exit(RecipeError.exit_code)


@cli.command()
@click.argument("key", required=False, default="")
def explain(key: str) -> None:
    """What recipe setting KEY (e.g. finetune.batch_size) means, its type and default, and the settings under it;
    every setting without KEY. The text is the setting's docstring in the recipe model, as in the chart's README."""
    import textwrap

    from kubetune.config import recipe_json_schema
    from kubetune.k8s.valuestable import rows

    found = [row for row in rows(recipe_json_schema(), {}) if not key or row[0] == key or row[0].startswith(key + ".")]
    if not found:
        raise click.BadParameter(f"{key}: no such recipe setting (`kubetune explain` lists them all)",
                                 param_hint="KEY")
    for name, kind, default, text in found:
        click.echo(f"{name}: {kind}" + (f", default {default.strip('`')}" if default else ""))
        if text:
            click.echo(textwrap.fill(" ".join(text.replace("``", "`").split()), 100, initial_indent="    ",
                                     subsequent_indent="    "))


def _verbose(ctx: click.Context) -> int:
    return int(((ctx.find_root().obj or {}).get("verbose")) or 0)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--stages", "only", default=None, metavar="S1,S2",
              help="Comma-separated subset of the recipe's stages to run (default: all of them).")
@set_option
@click.pass_context
def run(ctx: click.Context, recipe_path: str, only: str | None, overrides: tuple[str, ...]) -> None:
    """Run RECIPE's stages in this process, skipping those already done, and print a summary table."""
    from kubetune.config import load_recipe
    from kubetune.console import quiet_libraries

    quiet_libraries(_verbose(ctx))
    from kubetune.errors import RecipeError
    from kubetune.runner import run_pipeline

    recipe = load_recipe(recipe_path, list(overrides))
    stages = list(recipe.stages)
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in recipe.stages]
        if unknown:
            raise RecipeError("--stages", [f"{s}: not a stage of this recipe ({', '.join(recipe.stages)})"
                                           for s in unknown])
        stages = [s for s in recipe.stages if s in wanted]
    run_pipeline(recipe, stages)


@cli.command("evaluate")
@click.argument("model_dir")
@click.option("--data", "data", required=True, help="Test set: a .jsonl/.json/.csv/.parquet file or folder, a hub "
              "data set id, or builtin:text2sql; every row is scored.")
@click.option("--template", default=None, help="Prompt template with {context} and {question} (default: the one "
              "saved with the model, kubetune_prompt.json, else the recipe default); @FILE reads it from a file.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="The file's column for context, question or answer, e.g. --column question=q (repeatable).")
@click.option("--split", default="train", show_default=True, help="Split of a hub data set or folder.")
@click.option("--max-examples", type=click.IntRange(1), default=None, help="Score the first N rows only.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (never overwritten); default evaluations/<model folder>-<data>.")
@click.option("--name", default=None, help="The model's name in the files (default: merged, quantized or adapter).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--databases", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Test-suite databases each query runs on (as evaluate.databases).")
def evaluate_command(model_dir: str, data: str, template: str | None, columns: tuple[str, ...], split: str,
                     max_examples: int | None, out: str | None, name: str | None, max_new_tokens: int,
                     batch_size: int, databases: int) -> None:
    """Score MODEL_DIR (a run's merged or GPTQ output, an adapter folder, any transformers model folder or hub
    id) on --data with the evaluate stage's evaluator; writes what infer and evaluate write into --out."""
    from pathlib import Path

    from kubetune.errors import DataError
    from kubetune.score import evaluate_model
    from kubetune.stages.evaluate import format_summary

    if template is not None and template.startswith("@"):
        try:
            template = Path(template[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"--template {template}: cannot read ({exc.strerror})") from None
    mapping = {}
    for text in columns:
        field, sep, column = text.partition("=")
        if not sep or not column:
            raise DataError(f"--column {text!r}: expected FIELD=NAME, e.g. question=q")
        mapping[field] = column
    result = evaluate_model(model_dir, data, out, template=template, columns=mapping or None, split=split,
                            max_examples=max_examples, name=name, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, databases=databases)
    click.echo(format_summary(result))


@cli.command("serve")
@click.argument("run")
@click.option("--model", "which", type=click.Choice(["merged", "quantized"]), default=None,
              help="Which model of the run (default: the recipe's serve.model).")
@click.option("--artifacts-root", default="artifacts", show_default=True, help="Where RUN is, if a run name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: serve.port, 8080).")
@click.option("--vllm", "vllm", default=None, envvar="KUBETUNE_VLLM",
              help="The vllm program, e.g. a separate environment's .venv-vllm/bin/vllm (default: vllm on PATH).")
@click.option("--dry-run", is_flag=True, help="Print the command and its environment instead of starting it.")
def serve_command(run: str, which: str | None, artifacts_root: str, host: str, port: int | None, vllm: str | None,
                  dry_run: bool) -> None:
    """Serve RUN's merged or GPTQ model with vLLM's OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /health), its saved prompt template applied (docs/serving.md). RUN: a run folder, a run name under
    --artifacts-root, or the run's recipe file."""
    import shlex

    from kubetune.serve import exec_server, server_plan
    from kubetune.ui.backend import open_run

    info = open_run(run, artifacts_root)
    which = which or info.recipe.serve.model
    plan = server_plan(info.recipe, info.layout, which, host=host, port=port, vllm=vllm)
    if dry_run:
        for key, value in plan.env.items():
            click.echo(f"{key}={shlex.quote(value)} \\")
        click.echo(shlex.join(plan.argv))
        return
    click.echo(f"serving {plan.model_dir} as '{plan.served_name}' on http://{host}:{port or info.recipe.serve.port}/v1",
               err=True)
    exec_server(plan)
