"""The estimate's disk cache: what the meta-device builds and traces found, per model config.

Importing torch and transformers' model classes is ~3.3 s of a cold ``kubetune estimate`` on a 2-core machine,
while the traces and the arithmetic after them take 0.1-0.8 s. What those imports are needed for depends only on the model's
config.json, the dtypes and the batch shapes: the model's shape (parameters, linears, layers), the saved-tensor
traces per (setup, batch, length), the KV cache per (dtype, batch, length). Those are kept in one JSON file per
config under ``$XDG_CACHE_HOME/kubetune/estimate`` (``KUBETUNE_ESTIMATE_CACHE`` sets the folder; ``off`` turns
the cache off), so a second estimate of the same model (another recipe, a ``--set`` what-if, ``kubetune
submit`` after ``kubetune estimate``) imports neither. The key also holds the torch and transformers versions and
a digest of this package's source, so an upgrade or an estimator change never reads stale figures. Token counts
of the training rows (:mod:`kubetune.estimate.rows`) are cached the same way, keyed by the tokenizer file's
size and mtime and the data settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV = "KUBETUNE_ESTIMATE_CACHE"


def cache_dir() -> Path | None:
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kubetune" / "estimate"


@functools.lru_cache(maxsize=1)
def environment_digest() -> str:
    """Versions of the libraries whose code the trace runs, and the estimator's own source."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package}=none")
    digest = hashlib.sha256("\n".join(parts).encode())
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def key_of(*parts: Any) -> str:
    text = json.dumps([environment_digest(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DiskCache:
    """One JSON object in one file; read once, written back (atomically) only when something was added."""

    def __init__(self, kind: str, key: str):
        folder = cache_dir()
        self.path = None if folder is None else folder / f"{kind}-{key}.json"
        self.data: dict[str, Any] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.data = {}  # a damaged entry is recomputed

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        if self.data.get(key) != value:
            self.data[key] = value
            self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.data, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass  # a read-only home: the estimate is still right, only slower next time


class NoCache(DiskCache):
    def __init__(self):
        self.path, self.data, self.dirty = None, {}, False
