"""``kubetune ui``: the compare page (docs/ui.md). Gradio and torch are imported inside the command, so that
``kubetune --help`` stays fast and kubetune works without the ``ui`` extra."""

from __future__ import annotations

import click

from kubetune.cli import cli


@cli.command("ui")
@click.argument("run", required=False)
@click.option("--artifacts-root", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the runs (run.artifacts_root), where RUN is looked up by name.")
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1; 0.0.0.0 for every "
                                           "interface, e.g. in a pod behind a Service].")
@click.option("--port", default=None, type=click.IntRange(1, 65535),
              help="Port [default: $CDSW_APP_PORT in Cloudera ML, else 7860].")
@click.option("--auth", default=None, metavar="USER:PASSWORD",
              help="Ask for this login (HTTP form). Prefer the variable KUBETUNE_UI_AUTH: a flag shows in `ps`.")
@click.option("--examples", default=200, show_default=True, type=click.IntRange(0),
              help="Evaluation rows offered in the example picker.")
@click.option("--endpoint", default=None, metavar="URL",
              help="Also compare the model served there (kubetune serve, a KServe InferenceService: "
                   "http://HOST:PORT), as the model 'served' (docs/serving.md).")
def ui_command(run: str | None, artifacts_root: str, host: str | None, port: int | None, auth: str | None,
               examples: int, endpoint: str | None) -> None:
    """Compare RUN's models side by side in a browser: greedy answers, their SQL executed and judged, latency,
    tokens/s and GPU memory.

    RUN is a run folder, a run name under --artifacts-root, or a recipe file (to compare the base model before
    anything has run); left out, the run that finished a stage last. Models: base, and adapter, merged and
    quantized when their stage has finished. Never opens a public share link.
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise click.ClickException("the UI needs Gradio: pip install 'kubetune[ui]'") from None
    from kubetune.ui.app import launch
    from kubetune.ui.backend import ModelPool, eval_examples, open_run, with_endpoint
    from kubetune.ui.settings import parse_auth, resolve_bind

    try:
        bind = resolve_bind(host, port)
        login = parse_auth(auth)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    info = open_run(run, artifacts_root)
    if endpoint:
        info = with_endpoint(info, endpoint)
    rows = eval_examples(info, examples) if examples else []
    pool = ModelPool(info)
    click.echo(f"run {info.name} ({info.layout.run_dir}): models {', '.join(info.models)}; "
               f"{len(rows)} evaluation examples")
    click.echo(f"serving on http://{bind.host}:{bind.port} (port from {bind.source})"
               f"{'; login required' if login else ''}")
    try:
        launch(pool, rows, bind, login)
    finally:
        pool.close()
