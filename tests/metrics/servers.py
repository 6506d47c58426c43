"""Real Prometheus and Pushgateway processes on loopback ports, for the metrics tests.

The binaries come from Debian (scripts/install-monitoring.sh); without them a test is skipped on a laptop and
fails in CI (KUBETUNE_REQUIRE_SERVERS=1), through conftest.require_binary. Every process is started by the test,
on 127.0.0.1, with its own data folder, and stopped by its PID when the test ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from conftest import require_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def process(args: list[str], ready_url: str, log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(ready_url, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def pushgateway(tmp: Path):
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([binary, f"--web.listen-address=127.0.0.1:{port}"], f"{url}/-/ready", tmp / "pushgateway.log"):
        yield url


@contextmanager
def prometheus(tmp: Path, stage_port: int, pushgateway_url: str, interval: str = "500ms"):
    """Prometheus scraping a stage's /metrics and the Pushgateway (honor_labels, as a Pushgateway needs)."""
    binary = require_binary("prometheus")
    port = free_port()
    timeout = "400ms"
    pg = urllib.parse.urlparse(pushgateway_url).netloc
    config = {"global": {"scrape_interval": interval, "scrape_timeout": timeout, "evaluation_interval": "1s"},
              "scrape_configs": [
                  {"job_name": "stage", "static_configs": [{"targets": [f"127.0.0.1:{stage_port}"]}]},
                  {"job_name": "pushgateway", "honor_labels": True, "static_configs": [{"targets": [pg]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    args = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    with process(args, f"{url}/-/ready", tmp / "prometheus.log"):
        yield Prometheus(url)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params: Any) -> Any:
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 0.5) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for(self, expr: str, seconds: float = 20.0) -> list[dict]:
        """The instant result of ``expr`` once it is not empty (scrapes are asynchronous)."""
        deadline = time.monotonic() + seconds
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)
