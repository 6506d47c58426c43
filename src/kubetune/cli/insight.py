"""Commands that look at a recipe or its results without running a stage: ``estimate`` and ``report``."""

from __future__ import annotations

import json

import click

from kubetune.cli import cli, skip_interpreter_teardown
from kubetune.cli.local import set_option


class GpuType(click.ParamType):
    name = "GPU"

    def convert(self, value, param, ctx):
        from kubetune.gpus import find_gpu, gpu_names

        if not isinstance(value, str):
            return value
        gpu = find_gpu(value)
        if gpu is None:
            self.fail(f"{value!r} is not a card kubetune knows (one of {', '.join(gpu_names())}, or its "
                      "nvidia.com/gpu.product label)", param, ctx)
        return gpu


model_config_option = click.option(
    "--model-config", type=click.Path(exists=True), default=None, metavar="PATH",
    help="config.json (or a folder with one) to use instead of model.name_or_path: for hub models without "
         "network or cache (bench/configs/ has the shipped recipes' models).")


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--gpu", type=GpuType(), default=None,
              help="Card every GPU stage must fit (e.g. A100-40GB, H100-80GB); exit 12 if one does not. "
                   "Default: each stage's resources.<stage>.gpu_type, if set.")
@click.option("--headroom", type=click.FloatRange(0, 0.9), default=0.10, show_default=True,
              help="Share of the card's memory kept free when judging 'fits'.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON instead of tables.")
@model_config_option
@set_option
def estimate(recipe_path: str, gpu, headroom: float, as_json: bool, model_config: str | None,
             overrides: tuple[str, ...]) -> None:
    """Predict each stage's peak GPU memory for RECIPE from the model's config alone (no weights, no GPU).

    Prints the breakdown per stage, which cards it fits, and changes that would make it fit. Exits 12 when a
    stage does not fit the card it must run on (--gpu, or the stage's resources.gpu_type).
    """
    from rich.console import Console

    from kubetune.config import load_recipe
    from kubetune.errors import WontFitError
    from kubetune.estimate import estimate_recipe
    from kubetune.estimate.render import render

    recipe = load_recipe(recipe_path, list(overrides))
    result = estimate_recipe(recipe, model_config=model_config, gpu=gpu, headroom=headroom)
    skip_interpreter_teardown()  # the estimate cache is saved; only printing is left
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        Console(width=max(Console().width, 140)).print(render(result))
    failures = result.failures()
    if failures:
        what = "; ".join(f"{stage} needs {result.stage(stage).total_bytes / 2**30:.1f} GiB, "
                         f"{card.name} has {card.memory_bytes / 2**30:.1f} GiB" for stage, card in failures)
        raise WontFitError(f"{recipe_path}: does not fit with {headroom:.0%} headroom: {what}")


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.md, report.html and memory.png (default: RUN_DIR/report for one run, "
                   "./report for several).")
@click.option("--recipe", "recipe_paths", multiple=True, type=click.Path(dir_okay=False, exists=True),
              metavar="FILE",
              help="Recipe of a run whose stage reports do not carry it (matched by run.name; with one run, "
                   "used for it). Repeatable.")
@click.option("--no-estimate", is_flag=True, help="Leave out the estimate (it imports torch and transformers).")
@model_config_option
def report(run_dirs: tuple[str, ...], out_dir: str | None, recipe_paths: tuple[str, ...], no_estimate: bool,
           model_config: str | None) -> None:
    """Write a markdown and an HTML report, with a memory chart, from the stage reports of RUN_DIR(s).

    RUN_DIR is <artifacts_root>/<run>. Per stage: time, peak GPU memory, footprint, parameters by dtype and
    throughput; the evaluation table; and each stage's estimated memory next to the measured one.
    """
    from pathlib import Path

    from kubetune.config import load_recipe
    from kubetune.errors import RecipeError
    from kubetune.report import build_report, write_report

    dirs = [Path(d) for d in run_dirs]
    recipes = {}
    for path in recipe_paths:
        recipe = load_recipe(path)
        name = recipe.run.name if recipe.run.name in {d.name for d in dirs} else None
        if name is None and len(dirs) == 1 and len(recipe_paths) == 1:
            name = dirs[0].name
        if name is None:
            raise RecipeError(path, [f"run.name '{recipe.run.name}' is none of the runs given "
                                     f"({', '.join(d.name for d in dirs)})"])
        recipes[name] = recipe
    target = Path(out_dir) if out_dir else (dirs[0] / "report" if len(dirs) == 1 else Path("report"))
    result = build_report(dirs, recipes=recipes, model_config=model_config, estimates=not no_estimate)
    for path in write_report(result, target):
        click.echo(f"wrote {path}")
    for note in result.notes:
        click.secho(note, fg="yellow", err=True)
