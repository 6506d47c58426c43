"""Commands that talk to Kubernetes from your machine: render, submit, status, logs, cancel, list, stage-in.

``kubernetes`` is imported inside the commands only (``kubetune --help`` stays fast). The cluster is found
as kubectl finds it (--kubeconfig, $KUBECONFIG, ~/.kube/config, else the pod's service account); the
namespace is --namespace, else the recipe's kubernetes.namespace (render, submit), else the context's.
Each option is also an environment variable: ``KUBETUNE_NAMESPACE`` / ``KUBETUNE_CONTEXT`` /
``KUBETUNE_KUBECONFIG`` for every command, and ``KUBETUNE_<COMMAND>_<OPTION>`` for all of them.
"""

from __future__ import annotations

import click

from kubetune.cli import cli
from kubetune.cli.insight import model_config_option
from kubetune.cli.local import set_option
from kubetune.config import POD_STAGES


def _cluster_options(fn):
    fn = click.option("--kubeconfig", envvar="KUBETUNE_KUBECONFIG", type=click.Path(dir_okay=False),
                      help="Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).")(fn)
    fn = click.option("--context", envvar="KUBETUNE_CONTEXT", help="Kubeconfig context to use.")(fn)
    fn = click.option("-n", "--namespace", envvar="KUBETUNE_NAMESPACE",
                      help="Namespace (default: the recipe's kubernetes.namespace, else the context's).")(fn)
    return fn


def _echo(line: str) -> None:
    click.echo(line)


def _connect(namespace, context, kubeconfig, recipe=None):
    from kubetune.k8s.api import connect

    return connect(namespace, context, kubeconfig, recipe.kubernetes.namespace if recipe else None)


def _load(recipe_path: str, overrides: tuple[str, ...]):
    from kubetune.config import load_recipe
    from kubetune.k8s.embedded import check_embedded

    return check_embedded(load_recipe(recipe_path, list(overrides)), recipe_path)


serve_option = click.option(
    "--serve", "serve", type=click.Choice(["merged", "quantized"]), default=None,
    help="Instead of the pipeline: what serves this model of the finished run (serve.platform: a KServe "
         "InferenceService or a Deployment + Service; docs/serving.md).")


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--stage", type=click.Choice(POD_STAGES), default=None,
              help="Only what running this one stage needs (default: every object of the pipeline).")
@click.option("--no-stage-jobs", is_flag=True,
              help="Only what `submit` creates (claim, recipe, driver and its RBAC), e.g. for a kustomize base.")
@click.option("-n", "--namespace", envvar="KUBETUNE_NAMESPACE",
              help="Namespace written into the objects (default: the recipe's, else 'default').")
@serve_option
@set_option
def render(recipe_path: str, stage: str | None, no_stage_jobs: bool, namespace: str | None, serve: str | None,
           overrides: tuple[str, ...]) -> None:
    """Print every Kubernetes object of RECIPE as YAML (what `submit` creates and the driver starts)."""
    from kubetune.k8s import render as r

    recipe = _load(recipe_path, overrides)
    if serve:
        from kubetune.k8s.serving import serving_objects

        objects = serving_objects(recipe, namespace, serve)
    else:
        objects = (r.base_objects(recipe, r.namespace_of(recipe, namespace)) if no_stage_jobs
                   else r.render(recipe, namespace, stage))
    click.echo(r.to_yaml(objects), nl=False)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--stage", type=click.Choice(("all",) + POD_STAGES), default="all", show_default=True,
              help="Run one stage as its own Job, or the whole pipeline through the driver.")
@click.option("--detach", "mode", flag_value="detach", default=True,
              help="Start the driver in the cluster and return (default): the laptop can close.")
@click.option("--wait", "mode", flag_value="wait",
              help="Drive the stages from here and return when they are done (this process must keep running).")
@click.option("--follow", "mode", flag_value="follow",
              help="Start the driver in the cluster, then stream each stage's log here; Ctrl-C leaves it running.")
@click.option("--dry-run", type=click.Choice(("client", "server")), default=None,
              help="client: print the objects, contact nothing; server: let the API server check them, store nothing.")
@click.option("--poll", "poll_s", type=float, default=None, help="Seconds between looks at the Jobs (--wait/--follow).")
@click.option("--force", is_flag=True,
              help="Submit even when the memory estimate says a stage does not fit its resources.gpu_type.")
@model_config_option
@serve_option
@_cluster_options
@set_option
def submit(recipe_path, stage, mode, dry_run, poll_s, force, model_config, serve, namespace, context, kubeconfig,
           overrides) -> None:
    """Run RECIPE on Kubernetes: the recipe ConfigMap, the claim, and one GPU Job per stage in turn.

    First estimates each stage's GPU memory (`kubetune estimate`) and refuses, exit 12, a stage that cannot fit
    the card its resources.gpu_type names, unless --force. Refuses, exit 15, kubetune's own image by a tag that
    was never published (the default until the first release): build and push your own (images/README.md).
    With --serve, creates what serves the finished run's model instead (the claim must hold it).
    """
    from kubetune.k8s import launcher
    from kubetune.k8s.image import require_published
    from kubetune.k8s.render import claim_paths_check, namespace_of, render as render_objects, to_yaml

    recipe = _load(recipe_path, overrides)
    claim_paths_check(recipe)
    if dry_run != "client":  # what --dry-run client prints is a template to edit, like `render`
        require_published(recipe.kubernetes.image)
    if serve:
        from kubetune.k8s.serving import serving_objects

        if dry_run == "client":
            click.echo(to_yaml(serving_objects(recipe, namespace, serve)), nl=False)
            return
        cluster = _connect(namespace, context, kubeconfig, recipe)
        launcher.apply(cluster, serving_objects(recipe, cluster.namespace, serve), recipe, _echo,
                       dry_run=dry_run == "server")
        return
    _check_fits(recipe, recipe_path, model_config, force)
    one = None if stage == "all" else stage
    if dry_run == "client":
        objects = render_objects(recipe, namespace_of(recipe, namespace), one)
        if one is None and mode == "wait":  # driving from here: no in-cluster driver and no RBAC for it
            objects = [o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] != "driver"]
        click.echo(to_yaml(objects), nl=False)
        return
    cluster = _connect(namespace, context, kubeconfig, recipe)
    launcher.submit(cluster, recipe, one, mode, _echo, dry_run=dry_run == "server", poll_s=poll_s)


@cli.command()
@click.argument("run", required=False)
@_cluster_options
def status(run: str | None, namespace, context, kubeconfig) -> None:
    """Per stage of RUN (default: every run in the namespace): phase, pod, node, GPU, start, duration, peak VRAM."""
    from kubetune.k8s import launcher

    cluster = _connect(namespace, context, kubeconfig)
    runs = [run] if run else [line.split()[0] for line in launcher.list_runs(cluster)[1:]]
    if not runs:
        click.echo(f"no kubetune runs in namespace {cluster.namespace}")
    for i, name in enumerate(runs):
        if len(runs) > 1:
            click.echo(("\n" if i else "") + f"run {name}")
        for line in launcher.format_rows(launcher.status_rows(cluster, name)):
            click.echo(line)


@cli.command()
@click.argument("run")
@click.option("--stage", required=True, type=click.Choice(("driver",) + POD_STAGES), help="Whose log to show.")
@click.option("-f", "--follow", is_flag=True, help="Wait for the pod to start and stream its log until it ends.")
@_cluster_options
def logs(run: str, stage: str, follow: bool, namespace, context, kubeconfig) -> None:
    """Print the log of RUN's STAGE pod (its newest pod, if it was retried)."""
    import time

    from kubetune.k8s import launcher, render

    cluster = _connect(namespace, context, kubeconfig)
    selector = (f"{render.selector(run)},{launcher.DRIVER_SELECTOR}" if stage == "driver"
                else render.selector(run, stage))
    job = render.Names(run).driver if stage == "driver" else render.Names(run).job(stage)
    for line in launcher.stream_logs(cluster, selector, follow, poll_s=2.0, sleep=time.sleep,
                                     echo=lambda s: click.echo(s, err=True), job_name=job):
        click.echo(line)


@cli.command()
@click.argument("run")
@_cluster_options
def cancel(run: str, namespace, context, kubeconfig) -> None:
    """Stop RUN: delete its driver and stage Jobs (with their pods), recipe and RBAC; the artifacts stay."""
    from kubetune.k8s import launcher

    launcher.cancel(_connect(namespace, context, kubeconfig), run, _echo)


@cli.command(name="list")
@_cluster_options
def list_(namespace, context, kubeconfig) -> None:
    """List the kubetune runs in the namespace with their progress."""
    from kubetune.k8s import launcher

    cluster = _connect(namespace, context, kubeconfig)
    lines = launcher.list_runs(cluster)
    click.echo("\n".join(lines) if lines else f"no kubetune runs in namespace {cluster.namespace}")


@cli.command("stage-in")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--run", "run", required=True, help="The run whose claim receives the folders.")
@click.option("--to", "to", default=None, metavar="DEST",
              help="Where PATH goes on the claim, relative to its mount path (default: PATH, if it is a relative "
                   "path inside the claim).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="The run's recipe, before it is submitted (its claim is created if the recipe creates one); "
                   "default: the submitted run's recipe.")
@_cluster_options
def stage_in(paths, run, to, recipe_path, namespace, context, kubeconfig) -> None:
    """Copy local model or data folders (or files) onto RUN's claim through a short-lived helper pod and the API's
    exec (what `kubectl cp` does); the recipe is not changed: the command prints the path to put in it."""
    from kubetune.errors import RecipeError
    from kubetune.k8s import launcher
    from kubetune.k8s.stagein import stage_in as copy_in

    recipe = _load(recipe_path, ()) if recipe_path else None
    cluster = _connect(namespace, context, kubeconfig, recipe)
    if recipe is None:
        recipe = launcher.run_recipe(cluster, run)
        if recipe is None:
            raise RecipeError(run, [f"no submitted run '{run}' in namespace {cluster.namespace}: pass its recipe "
                                    "with --recipe (its claim is created if the recipe creates one)"])
    if recipe.run.name != run:
        raise RecipeError(recipe_path or run, [f"run.name: is '{recipe.run.name}', not '{run}'"])
    copy_in(cluster, recipe, list(paths), to, _echo, create_claim=recipe_path is not None)


def _check_fits(recipe, recipe_path: str, model_config: str | None, force: bool) -> None:
    """Refuse a recipe whose estimated peak exceeds a requested card (WontFitError), unless forced.

    Only stages with a known resources.<stage>.gpu_type are judged. When the model's config cannot be read
    (a hub id with no network or cache), say so and go on: the estimate guards, it must not block. The same
    estimate refuses packing for a model whose attention would let packed examples see each other (exit 3),
    which would otherwise fail in the fine-tune's pod, after the image pull and the model load.
    """
    packing = "finetune" in recipe.stages and recipe.finetune.packing
    if not packing and not any(getattr(recipe.resources, s).gpu_type for s in recipe.stages):
        return
    from kubetune.errors import KubetuneError, RecipeError, WontFitError
    from kubetune.estimate import estimate_recipe

    try:
        result = estimate_recipe(recipe, model_config=model_config, suggest=False)
    except RecipeError:
        raise
    except KubetuneError as exc:
        click.secho(f"warning: memory estimate skipped ({exc}); pass --model-config to check fit", fg="yellow",
                    err=True)
        return
    failures = result.failures()
    if not failures:
        return
    what = "; ".join(f"{stage} needs {result.stage(stage).total_bytes / 2**30:.1f} GiB, {card.name} has "
                     f"{card.memory_bytes / 2**30:.1f} GiB" for stage, card in failures)
    if force:
        click.secho(f"warning: --force: submitting although {what}", fg="yellow", err=True)
        return
    raise WontFitError(f"{recipe_path}: {what} (see `kubetune estimate {recipe_path}`; --force submits anyway)")
