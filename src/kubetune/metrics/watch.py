"""``kubetune watch RUN``: live per-stage progress and GPU memory, read from each running stage pod's ``/metrics``
through the API server's pod proxy (``GET /api/v1/namespaces/NS/pods/POD:PORT/proxy/metrics``): no
port-forward, no Prometheus, only the ``get`` verb on ``pods/proxy`` in the run's namespace. When no stage runs
or is queued any more (and the driver, if any, has ended), it prints the stage reports and stops.

The cluster side goes through kubetune.k8s (jobs, pods, the recipe ConfigMap); this module only adds the proxy
read and the parsing of the exposition text into a few figures per stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.k8s import render
from kubetune.k8s.state import human_bytes, human_seconds, job_state, newest_pod_of
from kubetune.sources import pod_stages
from kubetune.terminal import literal, printable

ScrapeFn = Callable[[str, int], str]  # (pod name, port) -> exposition text; raises on failure


@dataclass
class Figures:
    """What one scrape says about a stage; None where the stage does not report it."""

    progress: float | None = None
    steps: tuple[float, float | None] | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    layers: tuple[float, float | None] | None = None
    gpus: dict[str, dict[str, float]] = field(default_factory=dict)  # gpu index -> used/total/process/peak


def parse(text: str) -> Figures:
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    f = Figures()
    gpu_keys = {"kubetune_gpu_memory_used_bytes": "used", "kubetune_gpu_memory_total_bytes": "total",
                "kubetune_gpu_process_memory_used_bytes": "process",
                "kubetune_gpu_process_memory_peak_bytes": "peak"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in gpu_keys:
                f.gpus.setdefault(s.labels.get("gpu", "?"), {})[gpu_keys[s.name]] = s.value
            else:
                values[s.name] = s.value
    f.progress = values.get("kubetune_stage_progress_ratio")
    if "kubetune_train_completed_steps" in values:
        f.steps = (values["kubetune_train_completed_steps"], values.get("kubetune_train_planned_steps"))
    if "kubetune_quantize_completed_layers" in values:
        f.layers = (values["kubetune_quantize_completed_layers"], values.get("kubetune_quantize_planned_layers"))
    f.loss = values.get("kubetune_train_loss")
    f.tokens_per_second = values.get("kubetune_train_tokens_per_second")
    f.eta_seconds = values.get("kubetune_train_eta_seconds")
    return f


@dataclass
class StageView:
    stage: str
    state: str  # not started, queued, running, done, failed
    pod: str | None = None
    figures: Figures | None = None
    note: str = ""  # why there are no figures


class Watcher:
    """One look at a run per :meth:`poll`; ``scrape`` reads a pod's metrics (the pod proxy, or a test's fake)."""

    def __init__(self, cluster, run: str, scrape: ScrapeFn, port: int | None = None):
        from kubetune.k8s.launcher import run_recipe

        self.cluster, self.run, self.scrape = cluster, run, scrape
        self.recipe = run_recipe(cluster, run)
        self.port = port or (self.recipe.metrics.port if self.recipe else None)
        self.last: dict[str, Figures] = {}  # a finished stage keeps the figures of its last scrape

    def poll(self) -> tuple[list[StageView], bool]:
        """(one view per stage, whether the run has ended: nothing running or queued, the driver done)."""
        jobs = self.cluster.list("Job", render.selector(self.run))
        pods = self.cluster.list("Pod", render.selector(self.run))
        by_stage = {(j["metadata"].get("labels") or {}).get(render.LABEL_STAGE): j for j in jobs}
        driver = by_stage.pop(None, None)
        stages = pod_stages(self.recipe) if self.recipe else [s for s in by_stage if s]
        views = []
        for stage in stages:
            job = by_stage.get(stage)
            if job is None:
                views.append(StageView(stage, "not started"))
                continue
            state, reason = job_state(job)
            pod = newest_pod_of(job, pods)
            view = StageView(stage, state, pod=pod["metadata"]["name"] if pod else None, note=reason)
            if state == "running" and pod and (pod.get("status") or {}).get("phase") == "Running":
                view.figures, view.note = self._figures(view.pod, stage)
            else:
                view.figures = self.last.get(stage)
                if state == "running" and not view.note:
                    view.note = "pod " + ((pod or {}).get("status") or {}).get("phase", "not created yet").lower()
            views.append(view)
        active = any(v.state in ("running", "queued") for v in views)
        driver_running = driver is not None and job_state(driver)[0] == "running"
        ended = bool(jobs) and not active and not driver_running
        return views, ended

    def _figures(self, pod: str, stage: str) -> tuple[Figures | None, str]:
        if not self.port:
            return self.last.get(stage), "metrics port unknown (recipe ConfigMap unreadable; use --port)"
        try:
            figures = parse(self.scrape(pod, self.port))
        except Exception as exc:  # not listening yet, proxy refused (RBAC), pod gone between list and get
            return self.last.get(stage), f"no metrics yet ({str(exc).splitlines()[0][:120]})"
        self.last[stage] = figures
        return figures, ""


def pod_proxy_scraper(api_client, namespace: str) -> ScrapeFn:
    """Read a pod's /metrics through the API server (verb get on pods/proxy)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def scrape(pod: str, port: int) -> str:
        response = core.connect_get_namespaced_pod_proxy_with_path(f"{pod}:{port}", namespace, "metrics",
                                                                   _preload_content=False, _request_timeout=10)
        return response.data.decode("utf-8", "replace")

    return scrape


# ---- display ---------------------------------------------------------------------------------------------------
def _detail(f: Figures | None) -> str:
    if f is None:
        return ""
    parts = []
    if f.steps:
        parts.append(f"step {f.steps[0]:.0f}/{f.steps[1]:.0f}" if f.steps[1] else f"step {f.steps[0]:.0f}")
    if f.loss is not None:
        parts.append(f"loss {f.loss:.4g}")
    if f.tokens_per_second is not None:
        parts.append(f"{f.tokens_per_second:,.0f} tok/s")
    if f.eta_seconds is not None:
        parts.append(f"ETA {human_seconds(f.eta_seconds)}")
    if f.layers:
        parts.append(f"layer {f.layers[0]:.0f}/{f.layers[1]:.0f}" if f.layers[1] else f"layer {f.layers[0]:.0f}")
    return ", ".join(parts)


def _vram(f: Figures | None) -> str:
    if f is None or not f.gpus:
        return ""
    cells = []
    for gpu, g in sorted(f.gpus.items()):
        used = g.get("process", g.get("used"))
        peak, total = human_bytes(g.get("peak")), human_bytes(g.get("total"))
        cells.append(f"GPU{gpu} {human_bytes(used)} (peak {peak}) / {total}")
    return "; ".join(cells)


def table(run: str, views: list[StageView]):
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    t = Table(title=f"run {run}", title_justify="left")
    for col in ("stage", "state", "progress", "", "VRAM used (peak) / capacity"):
        t.add_column(col)
    for v in views:
        ratio = v.figures.progress if v.figures else None
        if v.state == "done":
            ratio = 1.0
        bar = ProgressBar(total=1.0, completed=ratio or 0.0, width=24) if ratio is not None else ""
        pct = f"{100 * ratio:.0f}%" if ratio is not None else ""
        detail = " ".join(x for x in (pct, _detail(v.figures), v.note) if x)
        t.add_row(v.stage, literal(v.state), bar, literal(detail), _vram(v.figures))  # pod reasons: cluster text
    return t


def watch(cluster, run: str, scrape: ScrapeFn, console, interval_s: float = 5.0, once: bool = False,
          port: int | None = None, sleep: Callable[[float], None] = time.sleep) -> list[StageView]:
    """Draw the run until it ends (or once), then print the stage reports; returns the last views."""
    from rich.live import Live

    from kubetune.errors import ClusterError
    from kubetune.k8s.launcher import format_rows, status_rows

    watcher = Watcher(cluster, run, scrape, port)
    views, ended = watcher.poll()
    if not views:
        raise ClusterError(f"no run '{run}' in namespace {cluster.namespace} (see `kubetune list`)")
    if not once and not ended:
        with Live(table(run, views), console=console, refresh_per_second=4, transient=True) as live:
            while not ended:
                sleep(interval_s)
                views, ended = watcher.poll()
                live.update(table(run, views))
    console.print(table(run, views))
    if ended:
        console.print("stage reports:")
        for line in format_rows(status_rows(cluster, run)):
            console.print(printable(line), highlight=False, markup=False, soft_wrap=True)
    return views
