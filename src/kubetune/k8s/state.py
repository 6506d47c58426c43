"""Reading Job and pod status dicts: what a stage is doing, and why it is stuck. Pure functions, no API calls."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune.stage_report import peak_of

JobState = Literal["queued", "running", "done", "failed"]
# Waiting reasons that never clear on their own: `status` shows them instead of a bare "Pending".
STUCK_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_state(job: dict[str, Any]) -> tuple[JobState, str]:
    """(state, reason). FailureTarget (1.31+) counts as failed: the Job is already terminating its pods."""
    if job.get("kind") in ("TrainJob", "PyTorchJob"):
        return training_job_state(job)
    if condition(job, "Complete"):
        return "done", ""
    for kind in ("Failed", "FailureTarget"):
        cond = condition(job, kind)
        if cond:
            return "failed", ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    if (job.get("spec") or {}).get("suspend"):
        return "queued", "suspended until Kueue admits it"
    return "running", ""


def training_job_state(obj: dict[str, Any]) -> tuple[JobState, str]:
    """A multi-node fine-tune's object: a TrainJob (conditions Complete, Failed, Suspended) or a PyTorchJob
    (Succeeded, Failed; runPolicy.suspend while Kueue holds it)."""
    trainjob = obj.get("kind") == "TrainJob"
    if condition(obj, "Complete" if trainjob else "Succeeded"):
        return "done", ""
    failed = condition(obj, "Failed")
    if failed:
        return "failed", ": ".join(x for x in (failed.get("reason"), failed.get("message")) if x)
    spec = obj.get("spec") or {}
    suspended = spec.get("suspend") if trainjob else (spec.get("runPolicy") or {}).get("suspend")
    if suspended or (trainjob and condition(obj, "Suspended")):
        return "queued", "suspended until Kueue admits it"
    return "running", ""


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def duration(start: str | None, end: str | None, now: datetime.datetime | None = None) -> float | None:
    began = parse_time(start)
    if began is None:
        return None
    ended = parse_time(end) or now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (ended - began).total_seconds())


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class PodView:
    name: str
    phase: str
    node: str
    reason: str  # why it is stuck (image pull, unschedulable), or how it ended
    exit_code: int | None
    summary: dict[str, Any]  # the stage's termination message (report summary), if it wrote one


def pod_view(pod: dict[str, Any]) -> PodView:
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    reason, exit_code, summary = "", None, {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            reason = f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".rstrip(": ")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason") in STUCK_REASONS:
            w = state["waiting"]
            reason = f"{w['reason']}: {w.get('message', '')}".rstrip(": ")
        if "terminated" in state:
            t = state["terminated"]
            exit_code = t.get("exitCode")
            summary = parse_summary(t.get("message"))
            if exit_code:
                tail = (t.get("message") or "").strip().splitlines()[-1:] if not summary else []
                reason = f"exit code {exit_code} ({t.get('reason', '')})" + (f": {tail[0][:160]}" if tail else "")
    return PodView(name=(pod.get("metadata") or {}).get("name", ""), phase=phase,
                   node=(pod.get("spec") or {}).get("nodeName") or "—", reason=reason, exit_code=exit_code,
                   summary=summary)


def newest_pod_of(job: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest pod the Job made (a retried Job has several; the newest says what is happening now)."""
    name = job["metadata"]["name"]
    return newest([p for p in pods if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == name])


def newest(objs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(objs, key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "", default=None)


# ---- the stage's termination message ---------------------------------------------------------------------
TERMINATION_LOG = "/dev/termination-log"


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The few report figures that `kubetune status` shows, small enough for a termination message (4 KiB)."""
    peak = peak_of(report)
    return {"kubetune": 1, "stage": report.get("stage"), "duration_s": report.get("duration_s"),
            "peak_vram_bytes": peak.gpu_bytes, "host_rss_bytes": peak.host_rss_bytes}


def write_termination_message(report: dict[str, Any], path: str = TERMINATION_LOG) -> bool:
    """Leave the summary where the kubelet copies it into the pod status; False outside a pod."""
    if not Path(path).exists():  # the kubelet creates it in a container; never create /dev files elsewhere
        return False
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(summary_of(report)))
        return True
    except OSError:
        return False


def parse_summary(message: str | None) -> dict[str, Any]:
    if not message or not message.lstrip().startswith("{"):
        return {}
    try:
        data = json.loads(message)
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("kubetune") == 1 else {}


# ---- events: why a Job has no pod, or a pod does not start ---------------------------------------------------
def _event_time(event: dict[str, Any]) -> str:
    meta = event.get("metadata") or {}
    return event.get("lastTimestamp") or event.get("eventTime") or meta.get("creationTimestamp") or ""


def waiting_reason(events: list[dict[str, Any]], job: str, pods: list[str]) -> str:
    """The newest Warning event about the Job (FailedCreate: a ResourceQuota on requests.nvidia.com/gpu, a Pod
    Security or SCC admission denial) or one of its pods (FailedScheduling, FailedAttachVolume, FailedMount, an
    image that cannot be pulled), as "Reason: message"; "" when nothing is wrong."""
    def about(event: dict[str, Any]) -> bool:
        obj = event.get("involvedObject") or event.get("regarding") or {}
        return (obj.get("kind") == "Job" and obj.get("name") == job) or (obj.get("kind") == "Pod"
                                                                          and obj.get("name") in pods)

    warnings = [e for e in events if e.get("type") == "Warning" and about(e)]
    if not warnings:
        return ""
    event = max(warnings, key=_event_time)
    message = " ".join(str(event.get("message") or event.get("note") or "").split())
    return f"{event.get('reason') or 'Warning'}: {message[:300]}".rstrip(": ")
