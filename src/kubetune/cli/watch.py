"""``kubetune watch RUN``: live progress and GPU memory of a run's stage pods (kubetune.metrics.watch)."""

from __future__ import annotations

import click

from kubetune.cli import cli
from kubetune.cli.cluster import _cluster_options


@cli.command()
@click.argument("run")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between two reads of the stage pods' metrics.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (for scripts).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Metrics port of the stage pods (default: the run's recipe.metrics.port).")
@_cluster_options
def watch(run: str, interval_s: float, once: bool, port: int | None, namespace, context, kubeconfig) -> None:
    """Show RUN's stages live: progress bars, loss, tokens/s, ETA and VRAM, read through the API server's pod
    proxy (needs get on pods/proxy); ends with the stage reports when the run is over."""
    from rich.console import Console

    from kubetune.k8s.api import KubeCluster, load_client
    from kubetune.metrics.watch import pod_proxy_scraper, watch as watch_run

    api_client, context_namespace = load_client(context, kubeconfig)
    ns = namespace or context_namespace or "default"
    watch_run(KubeCluster(api_client, ns), run, pod_proxy_scraper(api_client, ns), Console(), interval_s=interval_s,
              once=once, port=port)
