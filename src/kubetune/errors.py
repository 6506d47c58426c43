"""Errors that users can fix, each with its own exit code.

The exit code is the contract with Kubernetes: a Job's ``podFailurePolicy`` fails the Job at once on a
*permanent* code (retrying a bad recipe never helps) and lets the Job's ``backoffLimit`` retry anything else
(an OOM kill, a node going away). ``docs/exit-codes.md`` lists them; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path


class KubetuneError(Exception):
    """Base class: a one-line message for the user, never a traceback."""

    exit_code = 1
    permanent = False  # True: retrying the same pod cannot succeed


class RecipeError(KubetuneError):
    """The recipe file is missing, is not YAML, or breaks the schema (all problems listed at once)."""

    exit_code = 3
    permanent = True

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # the common case stays one line
            super().__init__(f"{source}: {problems[0]}")
        else:
            lines = "\n".join(f"  {p}" for p in problems)
            super().__init__(f"{source}: {len(problems)} problems\n{lines}")


class DataError(KubetuneError):
    """The data set cannot be read, lacks a column, or is empty."""

    exit_code = 4
    permanent = True


class ModelError(KubetuneError):
    """The model folder or hub id cannot be loaded, or needs remote code that the recipe does not allow."""

    exit_code = 5
    permanent = True


class ArtifactError(KubetuneError):
    """A finished artifact would be overwritten, an input artifact is missing, or the prompt contract is broken."""

    exit_code = 6
    permanent = True


class VerificationError(KubetuneError):
    """An output failed its own check (e.g. merged logits differ from adapter-on-base beyond tolerance)."""

    exit_code = 7
    permanent = True


class GateError(KubetuneError):
    """An evaluation gate in the recipe failed (the model is worse than the recipe allows)."""

    exit_code = 8
    permanent = True


class StageBusyError(KubetuneError):
    """Another process holds this stage's lock; retrying later is the right move."""

    exit_code = 9
    permanent = False


class ClusterError(KubetuneError):
    """The Kubernetes API refused or failed a request."""

    exit_code = 10
    permanent = False


class PipelineError(KubetuneError):
    """A stage Job of the pipeline failed; the driver stops (see `kubetune status` for which and why)."""

    exit_code = 11
    permanent = True


class WontFitError(KubetuneError):
    """The recipe's estimated GPU memory does not fit the requested GPU type (override with --force)."""

    exit_code = 12
    permanent = True


class StorageError(KubetuneError):
    """The artifacts volume is full, read-only, over quota or not writable; what was written before is kept."""

    exit_code = 13
    # Permanent: a retry of the same pod a few seconds later meets the same full or read-only volume, after
    # loading the model again. Free space (or fix the mount) and submit again: finished stages are skipped and
    # the fine-tune resumes from its last complete checkpoint.
    permanent = True


class DeviceError(KubetuneError):
    """A stage that requests GPUs sees no usable CUDA device (node driver too old for the image's CUDA, no device plugin)."""

    exit_code = 14
    # Permanent: the same pod on the same node meets the same driver. Training on the CPU instead would hold the
    # GPU for hours and finish nothing; only resources.<stage>.gpus: 0 asks for the CPU.
    permanent = True


class ImageError(KubetuneError):
    """The recipe's kubernetes.image is kubetune's own by a tag that was never published; build and push your own."""

    exit_code = 15
    # Raised by `submit` before it creates anything, never in a pod: no podFailurePolicy acts on it.
    permanent = False


class HubError(KubetuneError):
    """The model or data set hub could not be reached or failed to answer (connection, proxy, 5xx): retried."""

    exit_code = 17


# errno values that mean "the volume cannot take this write", whatever the library that hit them.
STORAGE_ERRNOS = {28: "no space left on the volume", 122: "disk quota exceeded", 30: "read-only file system",
                  13: "permission denied"}
# How libraries that do not raise OSError (safetensors' Rust writer, torch's zip writer) word the same errors.
STORAGE_PHRASES = {"No space left on device": 28, "StorageFull": 28, "os error 28": 28, "Disk quota exceeded": 122,
                   "Read-only file system": 30, "ReadOnlyFilesystem": 30, "os error 30": 30}
# torch.save to a path writes through a C++ stream that keeps no errno: a full volume reads as the first phrase,
# then "unexpected pos" when the zip writer closes. Which refusal it was is read from the volume itself.
TORCH_WRITER_FAILURES = ("basic_ios::clear: iostream error", "PytorchStreamWriter failed writing", "unexpected pos")
FULL_BELOW_BYTES = 1 << 20  # a failed write fills a volume to its last blocks: less free than this is full


def volume_refusal(path: str | Path) -> int | None:
    """The errno a write under ``path`` meets, judged from its volume: EROFS if read-only, ENOSPC if full."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return 30
    return 28 if st.f_bavail * st.f_frsize < FULL_BELOW_BYTES else None


def storage_error(exc: BaseException, volume: str | Path | None = None) -> StorageError | None:
    """A StorageError for a failed write anywhere in ``exc``'s chain (ENOSPC, EDQUOT, EROFS, EACCES), else None.

    ``volume``: the folder being written to, for writers that give no reason (torch.save to a path); their failure
    is a storage error only if that volume is indeed full or read-only."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        where = getattr(current, "filename", None)
        if code is None:
            text = str(current)
            code = next((c for phrase, c in STORAGE_PHRASES.items() if phrase in text), None)
            if code is None and volume is not None and any(phrase in text for phrase in TORCH_WRITER_FAILURES):
                code, where = volume_refusal(volume), volume
        if code in STORAGE_ERRNOS:
            return StorageError(f"{where or 'artifacts volume'}: {STORAGE_ERRNOS[code]}; nothing finished was lost "
                                "(free space or fix the mount, then run again)")
        current = current.__cause__ or current.__context__
    return None


class MissingProgramError(KubetuneError):
    """A program the command runs is not installed (vLLM for kubetune serve)."""

    exit_code = 16
    permanent = False  # raised by `kubetune serve` on a workstation, never in a stage pod: no Job policy needs it


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the log)",
    2: "command-line usage error (click)",
    **{cls.exit_code: (cls.__doc__ or "").strip().splitlines()[0] for cls in (
        RecipeError, DataError, ModelError, ArtifactError, VerificationError, GateError, StageBusyError,
        ClusterError, PipelineError, WontFitError, StorageError, DeviceError, ImageError, MissingProgramError,
        HubError)},
}
PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(sorted(
    cls.exit_code for cls in KubetuneError.__subclasses__() if cls.permanent))
