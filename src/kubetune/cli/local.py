"""Commands that work on this machine: validate a recipe, run one stage (what a pod runs), run the pipeline."""

from __future__ import annotations

import sys

import click

from kubetune.cli import cli
from kubetune.config import STAGE_NAMES

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", envvar="KUBETUNE_SET",
    help="Override a recipe value, e.g. --set finetune.lora.r=8 (repeatable; value parsed as YAML; "
         "env KUBETUNE_SET takes several separated by spaces).")


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


def exit_on_sigterm() -> None:
    """End with 143 on SIGTERM, as a process with the default action would, also as a container's PID 1.

    In a pod the entrypoint is PID 1 of its PID namespace, and the kernel drops a signal whose action is the
    default for PID 1: without a handler, `kubectl delete`, an eviction or a preemption would wait out the whole
    terminationGracePeriodSeconds (300 s by default) and end in SIGKILL (137). The fine-tune replaces this handler
    while it trains (checkpoint, then 143) and puts it back afterwards."""
    import signal

    def handle(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


@cli.command()
@click.argument("name", type=click.Choice(STAGE_NAMES))
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="Recipe file (in a pod: the mounted ConfigMap).")
@set_option
def stage(name: str, recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Run one stage NAME of a recipe (this is what each Kubernetes Job runs)."""
    from kubetune.config import load_recipe
    from kubetune.stages import run_stage

    exit_on_sigterm()
    recipe = load_recipe(recipe_path, list(overrides))
    if name in recipe.stages:  # an unknown stage gets run_stage's own error
        from kubetune.devices import require_gpus

        require_gpus(name, getattr(recipe.resources, name).gpus)  # before anything is read: exit 14, not CPU training
    result = run_stage(recipe, name, progress=_log_progress)
    from kubetune.k8s.state import write_termination_message

    write_termination_message(result.report)  # in a pod: `kubetune status` shows peak VRAM from it; else no-op
    word = "already done, skipped" if result.status == "skipped" else f"done in {result.report.get('duration_s', 0):.1f} s"
    click.echo(f"{name}: {word} → {result.path}")


def _log_progress(stage: str, completed: float, total: float | None, description: str) -> None:
    import logging

    logging.getLogger("kubetune.progress").debug("%s %s/%s %s", stage, completed, total, description)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--stages", "only", default=None, metavar="S1,S2",
              help="Comma-separated subset of the recipe's stages to run (default: all of them).")
@set_option
def run(recipe_path: str, only: str | None, overrides: tuple[str, ...]) -> None:
    """Run RECIPE's stages in this process, skipping those already done, and print a summary table."""
    from kubetune.config import load_recipe
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
