"""The commands a pod runs: ``kubetune stage`` (each stage Job) and ``kubetune drive`` (the driver Job).

Both start as PID 1 of their container (:func:`exit_on_sigterm`), read the recipe from the mounted ConfigMap and
leave what `kubetune status` shows in the pod's termination message or the Jobs they make.
"""

from __future__ import annotations

import sys

import click

from kubetune.cli import cli
from kubetune.cli.cluster import _cluster_options, _connect, _echo, _load
from kubetune.cli.local import _verbose, set_option
from kubetune.config import POD_STAGES


def exit_on_sigterm() -> None:
    """End with 143 on SIGTERM, as a process with the default action would, also as a container's PID 1.

    In a pod the entrypoint is PID 1 of its PID namespace, and the kernel drops a signal whose action is the
    default for PID 1: without a handler, `kubectl delete`, an eviction or a preemption would wait out the whole
    terminationGracePeriodSeconds (300 s by default) and end in SIGKILL (137). The fine-tune replaces this handler
    while it trains (checkpoint, then 143) and puts it back afterwards."""
    import signal

    def handle(signum, frame):
        # What the default action does, and no more: end now, without unwinding into library code (an exception
        # raised here can be caught and outlived by a library's cleanup, GPTQModel's for one). Nothing a stage
        # writes is final before its rename, so nothing is lost; the retry starts the stage again.
        import os

        os._exit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


@cli.command()
@click.argument("name", type=click.Choice(POD_STAGES))
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="Recipe file (in a pod: the mounted ConfigMap).")
@set_option
@click.pass_context
def stage(ctx: click.Context, name: str, recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Run one stage NAME of a recipe (this is what each Kubernetes Job runs)."""
    import logging

    from kubetune.config import load_recipe
    from kubetune.console import ProgressLines, quiet_libraries
    from kubetune.stages import run_stage

    quiet_libraries(_verbose(ctx))
    exit_on_sigterm()
    recipe = load_recipe(recipe_path, list(overrides))
    if name in recipe.stages:  # an unknown stage gets run_stage's own error
        from kubetune.devices import require_gpus

        require_gpus(name, getattr(recipe.resources, name).gpus)  # before anything is read: exit 14, not CPU training
    result = run_stage(recipe, name, progress=ProgressLines(logging.getLogger("kubetune.progress")))
    from kubetune.k8s.state import write_termination_message

    write_termination_message(result.report)  # in a pod: `kubetune status` shows peak VRAM from it; else no-op
    word = "already done, skipped" if result.status == "skipped" else f"done in {result.report.get('duration_s', 0):.1f} s"
    click.echo(f"{name}: {word} → {result.path}")


@cli.command()
@click.argument("run")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe file (in the driver pod: the mounted ConfigMap; default: read the run's ConfigMap).")
@click.option("--read-markers", is_flag=True,
              help="The claim is mounted here: skip stages whose _SUCCESS marker is already written.")
@click.option("--poll", "poll_s", type=float, default=None, help="Seconds between looks at the Jobs.")
@_cluster_options
def drive(run, recipe_path, read_markers, poll_s, namespace, context, kubeconfig) -> None:
    """Create RUN's stage Jobs one after another as each succeeds; safe to stop and start again at any time."""
    from kubetune.artifacts import RunLayout
    from kubetune.errors import RecipeError
    from kubetune.k8s import launcher, render
    from kubetune.k8s.driver import Driver

    exit_on_sigterm()  # the driver pod's PID 1: `kubetune cancel` must stop it now, not after the grace period
    recipe = _load(recipe_path, ()) if recipe_path else None
    cluster = _connect(namespace, context, kubeconfig, recipe)
    if recipe is None:
        recipe = launcher.run_recipe(cluster, run)
        if recipe is None:
            raise RecipeError(run, [f"no readable recipe ConfigMap for run '{run}' in namespace {cluster.namespace}"])
    if recipe.run.name != run:
        raise RecipeError(recipe_path or run, [f"run.name: is '{recipe.run.name}', not '{run}'"])
    layout = RunLayout.from_recipe(recipe) if read_markers else None
    # In the cluster the driver runs in its own Job, which then owns the stage Jobs (kubetune.k8s.driver)
    owner = cluster.get("Job", render.Names(run).driver)
    Driver(cluster, recipe, layout=layout, echo=_echo, owner=owner).run(poll_s)
    sys.stdout.flush()
