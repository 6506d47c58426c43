"""The artifact layout on the shared volume. This module alone knows where things live.

    <artifacts_root>/<run>/
        <stage>/              finished output of a stage (adapter, merged model, predictions, ...)
            _SUCCESS          written last: {"fingerprint": ..., "finished_at": ...}
            report.json       the stage report (time, memory, parameters, throughput, versions)
        sets/<set>/<stage>/   infer and evaluate of a named evaluation set (evaluate.sets), same contents; the
                              held-out split's are <stage>/ above
        .work/<stage>/        scratch that must survive a restart (fine-tune checkpoints)
        .tmp/<stage>-<id>/    output being written; renamed to <stage>/ when complete
        .locks/<stage>.lock   held while a stage runs, so a second copy of the pod waits instead of racing
        .trash/               anything moved aside instead of deleted (never lose what was written)

A stage counts as done only when ``_SUCCESS`` exists, and that file is written after the rename, so a
crash at any point leaves either no artifact or a complete one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from kubetune.config import HELDOUT_SET
from kubetune.errors import ArtifactError, StageBusyError, storage_error
from kubetune.stage_report import report_of

SUCCESS_MARKER = "_SUCCESS"
REPORT_FILE = "report.json"
StageState = Literal["missing", "done", "stale"]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash after it cannot bring the old entry back)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class RunLayout:
    root: Path
    run: str

    @classmethod
    def from_recipe(cls, recipe) -> "RunLayout":
        # Absolute, so that a library that changes the working directory (GPTQModel's log folder) cannot move it.
        return cls(Path(recipe.run.artifacts_root).expanduser().absolute(), recipe.run.name)

    @property
    def run_dir(self) -> Path:
        return self.root / self.run

    def stage_dir(self, stage: str, eval_set: str = HELDOUT_SET) -> Path:
        if eval_set != HELDOUT_SET:
            return self.run_dir / "sets" / eval_set / stage
        return self.run_dir / stage

    def work_dir(self, stage: str) -> Path:
        return self.run_dir / ".work" / stage

    def report_path(self, stage: str, eval_set: str = HELDOUT_SET) -> Path:
        return self.stage_dir(stage, eval_set) / REPORT_FILE

    def marker(self, stage: str, eval_set: str = HELDOUT_SET) -> dict | None:
        try:
            return json.loads((self.stage_dir(stage, eval_set) / SUCCESS_MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def state(self, stage: str, fingerprint: str, eval_set: str = HELDOUT_SET) -> StageState:
        marker = self.marker(stage, eval_set)
        if marker is None:
            return "missing"
        return "done" if marker.get("fingerprint") == fingerprint else "stale"

    def recipe_state(self, recipe, stage: str) -> StageState:
        """The state of ``stage`` for ``recipe`` over every evaluation set it scores (infer and evaluate)."""
        states = {self.state(stage, recipe.fingerprint(stage, s), s) for s in recipe.stage_sets(stage)}
        return "stale" if "stale" in states else "missing" if "missing" in states else "done"

    def read_report(self, stage: str, eval_set: str = HELDOUT_SET) -> dict | None:
        """The stage's report.json as its report model (kubetune.stage_report) reads it, with the keys the file
        has; None when it is missing or is no such report."""
        try:
            data = json.loads(self.report_path(stage, eval_set).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        try:
            return report_of(stage, data).model_dump(exclude_unset=True)
        except ValidationError:
            return None

    def require(self, stage: str, eval_set: str = HELDOUT_SET) -> Path:
        """The finished output of an upstream stage, or a clear error saying to run it first."""
        if self.marker(stage, eval_set) is None:
            raise ArtifactError(f"{self.stage_dir(stage, eval_set)}: stage '{stage}' has not finished; run it first")
        return self.stage_dir(stage, eval_set)

    # ---- writing -----------------------------------------------------------------------------------------
    @staticmethod
    def _unit(stage: str, eval_set: str) -> str:
        return stage if eval_set == HELDOUT_SET else f"{stage}@{eval_set}"

    @contextlib.contextmanager
    def lock(self, stage: str, eval_set: str = HELDOUT_SET) -> Iterator[None]:
        """Exclusive lock on a stage; a second process gets StageBusyError (retryable) instead of racing."""
        locks = self.run_dir / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fh = open(locks / f"{self._unit(stage, eval_set)}.lock", "a+")
        except OSError as exc:  # the first write of a stage: a read-only or full volume shows here
            raise storage_error(exc) or ArtifactError(f"{locks}: cannot create ({exc.strerror})") from None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise StageBusyError(f"stage '{stage}' of run '{self.run}' is running in another process") from None
                raise
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_temp_dir(self, stage: str, eval_set: str = HELDOUT_SET) -> Path:
        """A fresh folder for output in progress; older ones of this stage are leftovers of a crash."""
        tmp_root = self.run_dir / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        unit = self._unit(stage, eval_set)
        for old in tmp_root.glob(f"{unit}-*"):
            shutil.rmtree(old, ignore_errors=True)
        path = tmp_root / f"{unit}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def commit(self, stage: str, tmp_dir: Path, fingerprint: str, report: dict[str, Any],
               eval_set: str = HELDOUT_SET) -> Path:
        """Move a complete output into place, then write report.json and, last, _SUCCESS."""
        final = self.stage_dir(stage, eval_set)
        if (final / SUCCESS_MARKER).exists():
            raise ArtifactError(f"{final}: a finished artifact is already there; it is never overwritten "
                                "(use another run.name, or move the folder away)")
        if final.exists():  # a crash between rename and marker, or a user's folder: keep it, out of the way
            self.move_aside(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp_dir / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp_dir, final)
        fsync_dir(final.parent)
        marker = {"fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(final / SUCCESS_MARKER, json.dumps(marker) + "\n")
        return final

    def move_aside(self, path: Path) -> Path:
        trash = self.run_dir / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
        os.replace(path, dest)
        return dest
