"""One stage's metrics around :func:`kubetune.stages.run_stage`: a ``/metrics`` server while the stage runs, and
pushes to a Pushgateway (status ``running`` at the start, the final values at the end).

Which of the two happen is the recipe's ``metrics`` section: a stage pod that kubetune rendered serves on
``metrics.port`` (all interfaces, for the PodMonitor), any other process only with ``metrics.local`` (on
127.0.0.1); a push happens when ``metrics.pushgateway`` is set. Neither: the monitor does nothing and prometheus_client is not even imported.

Monitoring never fails a stage: a port in use or an unreachable Pushgateway is a warning in the log.

Why push at the start too: if the pod is killed (OOM, node lost) no final push comes, and its scrape target
vanishes; the Pushgateway then still says ``running`` with the start as the last progress, so the "stalled"
alert fires after its delay instead of the run silently disappearing from the dashboards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kubetune import __version__
from kubetune.metrics.names import technique
from kubetune.metrics.state import StageState

log = logging.getLogger(__name__)

PUSH_JOB = "kubetune"  # the Pushgateway's "job" grouping label; run and stage complete the grouping key
IN_POD_ENV = "KUBETUNE_IN_POD"  # set to "1" by kubetune.k8s.render in the stage pods it renders


def default_nvml() -> Any:
    """NVML for the collector: None lets it import pynvml. Tests replace this to run a stage on a fake GPU."""
    return None


def in_pod(env: dict[str, str] | None = None) -> bool:
    """A stage pod that kubetune rendered (its env has KUBETUNE_IN_POD=1). KUBERNETES_SERVICE_HOST does not tell:
    the kubelet sets it in every container, a notebook or a CML session too, where listening on all interfaces
    would publish the metrics to whoever shares the pod network."""
    return (os.environ if env is None else env).get(IN_POD_ENV) == "1"


def stage_labels(recipe, stage: str) -> dict[str, str]:
    return {"run": recipe.run.name, "stage": stage, "model": recipe.model.name_or_path,
            "technique": technique(recipe, stage)}


class StageMonitor:
    """Context manager for one stage run. ``progress(fn)`` wraps a ProgressFn so the metrics see every report;
    ``state`` is what the Trainer callback feeds (None when the monitor is inactive)."""

    def __init__(self, recipe, stage: str, *, nvml: Any = None, torch: Callable[[], Any] | None = None,
                 processes=None, env: dict[str, str] | None = None, clock: Callable[[], float] = time.time):
        m = recipe.metrics
        self.recipe, self.stage, self.settings = recipe, stage, m
        pod = in_pod(env)
        self.serve_address = ("0.0.0.0" if pod else "127.0.0.1") if m.enabled and (pod or m.local) else None
        self.push_url = m.pushgateway if m.enabled else None
        self.active = bool(self.serve_address or self.push_url)
        self._nvml, self._torch, self._processes, self._env, self._clock = nvml, torch, processes, env, clock
        self.state: StageState | None = None
        self.registry = None
        self.port: int | None = None  # the port actually served (metrics.port; 0 picks a free one, for tests)
        self._server = None
        self._finished = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> StageMonitor:
        if not self.active:
            return self
        from prometheus_client import CollectorRegistry

        from kubetune.metrics.collector import StageCollector, loaded_torch

        info = {"kubetune_version": __version__, "fingerprint": self.recipe.fingerprint(self.stage)}
        self.state = StageState(stage_labels(self.recipe, self.stage), info=info, clock=self._clock)
        nvml = self._nvml if self._nvml is not None else default_nvml()
        self.collector = StageCollector(self.state, nvml=nvml, torch=self._torch or loaded_torch,
                                        processes=self._processes, env=self._env)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        if self.serve_address:
            self._serve()
        self.push()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        if not self._finished:
            # SystemExit/KeyboardInterrupt: stopped from outside (the fine-tune exits 143 after a SIGTERM checkpoint)
            interrupted = exc_type is not None and not issubclass(exc_type, Exception)
            self.finish("interrupted" if interrupted else "failed" if exc_type is not None else "done")
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def finish(self, status: str, peak_memory: dict | None = None) -> None:
        """Record the end (status done/failed, the report's peaks) and push the final values."""
        if not self.active or self._finished:
            return
        self._finished = True
        self.state.finish(status, peak_memory)
        self.push()

    # ---- wiring ------------------------------------------------------------------------------------------
    def progress(self, inner: Callable) -> Callable:
        if self.state is None:
            return inner
        state = self.state

        def both(stage: str, completed: float, total: float | None, description: str) -> None:
            state.progress(stage, completed, total, description)
            inner(stage, completed, total, description)

        return both

    def _serve(self) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(self.settings.port, addr=self.serve_address, registry=self.registry)
        except OSError as exc:  # port in use (a second local run): the stage goes on without /metrics
            log.warning("metrics: cannot serve on %s:%s (%s); continuing without /metrics",
                        self.serve_address, self.settings.port, exc.strerror or exc)
            return
        self.port = self._server.server_port
        log.info("metrics: serving http://%s:%s/metrics", self.serve_address, self.port)

    def push(self) -> bool:
        """Replace this stage's group on the Pushgateway with the final-value families; False if it failed."""
        if not self.push_url:
            return False
        from prometheus_client import CollectorRegistry, push_to_gateway

        from kubetune.metrics.collector import StageCollector

        final = CollectorRegistry(auto_describe=False)
        final.register(StageCollector(self.state, nvml=self.collector.nvml, torch=self.collector.torch,
                                      processes=self.collector.processes, final_only=True, env=self._env))
        deadline_s = self.settings.push_timeout_s
        failures: list[Exception] = []

        def send() -> None:
            try:  # the socket timeout bounds each read, not the push: a server that trickles bytes never trips it
                push_to_gateway(self.push_url, job=PUSH_JOB, registry=final, timeout=deadline_s,
                                grouping_key={"run": self.recipe.run.name, "stage": self.stage})
            except Exception as exc:  # URLError, timeout, HTTP 4xx/5xx: never the stage's problem
                failures.append(exc)

        # A daemon thread: the stage waits push_timeout_s at most for the whole push, and a push still hanging
        # when the process ends does not keep it alive.
        sender = threading.Thread(target=send, name=f"kubetune-push-{self.stage}", daemon=True)
        sender.start()
        sender.join(deadline_s)
        if sender.is_alive():
            log.warning("metrics: push to %s did not finish within metrics.push_timeout_s=%g s; given up",
                        self.push_url, deadline_s)
            return False
        if failures:
            log.warning("metrics: push to %s failed: %s", self.push_url, failures[0])
            return False
        return True
