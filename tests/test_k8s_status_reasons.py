"""`kubetune status` says why a stage is not running, from the Events the cluster writes, instead of a bare "Pending".

Each case is the Event (and pod state) a real cluster leaves, with the wording of Kubernetes' own controllers: the
Job controller's FailedCreate when admission refuses the pod (a ResourceQuota on requests.nvidia.com/gpu, Pod
Security, an OpenShift SCC), the attach/detach controller's and the kubelet's volume events, the scheduler's
FailedScheduling and the kubelet's image pull failures. They are stored on the fake API server; `status` reads them
through the real client and the real CLI.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from k8s.fakeapi import FakeCluster
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.k8s import launcher, render
from kubetune.k8s.api import connect

pytestmark = pytest.mark.timeout(60)
JOB = "s1-finetune"
POD = "s1-finetune-abcde"

QUOTA = ('Error creating: pods "s1-finetune-abcde" is forbidden: exceeded quota: gpu-quota, requested: '
         'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4')
PSA = ('Error creating: pods "s1-finetune-abcde" is forbidden: violates PodSecurity "restricted:latest": '
       'seccompProfile (pod or container "stage" must set securityContext.seccompProfile.type)')
SCC = ('Error creating: pods "s1-finetune-abcde" is forbidden: unable to validate against any security context '
       'constraint: [provider "restricted-v2": .spec.securityContext.fsGroup: Invalid value: []int64{1001}: 1001 is '
       'not an allowed group]')
ATTACH = ('Multi-Attach error for volume "pvc-0b7c" Volume is already used by pod(s) s1-merge-xyz12')
MOUNT = ('MountVolume.MountDevice failed for volume "pvc-0b7c" : rpc error: code = Internal desc = mount failed: '
         'exit status 32')
PULL = 'Failed to pull image "registry.example.com/ml/kubetune:0.1.0": rpc error: code = NotFound'
GPU = '0/4 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: }, 3 Insufficient nvidia.com/gpu.'

CASES = {  # case: (object the event is about, reason, message, pod phase or None for no pod)
    "gpu quota": ("Job", "FailedCreate", QUOTA, None),
    "pod security admission": ("Job", "FailedCreate", PSA, None),
    "openshift scc": ("Job", "FailedCreate", SCC, None),
    "volume attach": ("Pod", "FailedAttachVolume", ATTACH, "Pending"),
    "volume mount": ("Pod", "FailedMount", MOUNT, "Pending"),
    "image pull": ("Pod", "Failed", PULL, "Pending"),
    "unschedulable gpu": ("Pod", "FailedScheduling", GPU, "Pending"),
}


def event(kind: str, name: str, reason: str, message: str, when: str, type_: str = "Warning") -> dict:
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{when[-3:-1]}{reason.lower()}"},
            "involvedObject": {"kind": kind, "name": name, "namespace": "ml"}, "reason": reason, "message": message,
            "type": type_, "count": 3, "firstTimestamp": when, "lastTimestamp": when}


@pytest.fixture
def fake():
    with FakeCluster("ml") as fc:
        yield fc


def submit_finetune(fake) -> dict:
    recipe = recipe_from_dict({"run": {"name": "s1"}, "model": {"name_or_path": ".cache/models/base"},
                               "stages": ["finetune"]})
    for obj in render.render(recipe, "ml", "finetune"):
        fake.put(obj["kind"], obj)
    return fake.objects("Job")[JOB]


@pytest.mark.parametrize("case", CASES)
def test_status_names_what_keeps_a_stage_from_running(fake, tmp_path, case):
    kind, reason, message, phase = CASES[case]
    job = submit_finetune(fake)
    if phase:
        fake.add_pod(job, POD, phase=phase)
    fake.put("Event", event(kind, JOB if kind == "Job" else POD, reason, message, "2026-12-06T10:00:05Z"))
    # noise that must not win: an older warning, a Normal event, and another object's warning
    fake.put("Event", event(kind, JOB if kind == "Job" else POD, "BackOff", "older", "2026-12-06T09:00:00Z"))
    fake.put("Event", event("Job", JOB, "SuccessfulCreate", "Created pod", "2026-12-06T10:00:09Z", "Normal"))
    fake.put("Event", event("Pod", "other-run-pod", "FailedMount", "not ours", "2026-12-06T10:00:09Z"))
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
    rows = {r.stage: r for r in launcher.status_rows(connect(kubeconfig=str(kubeconfig)), "s1")}
    assert rows["finetune"].phase == "Pending"
    assert rows["finetune"].reason == f"{reason}: {message}"
    shown = CliRunner().invoke(cli, ["status", "s1", "--kubeconfig", str(kubeconfig)])
    assert shown.exit_code == 0 and f"  finetune: {reason}: {message}" in shown.output.splitlines(), shown.output


def test_a_running_or_finished_stage_shows_no_stale_warning(fake, tmp_path):
    job = submit_finetune(fake)
    fake.put("Event", event("Job", JOB, "FailedCreate", QUOTA, "2026-12-06T10:00:05Z"))
    fake.add_pod(job, POD, phase="Running")  # the quota was raised: the pod was made at last
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
    rows = {r.stage: r for r in launcher.status_rows(connect(kubeconfig=str(kubeconfig)), "s1")}
    assert (rows["finetune"].phase, rows["finetune"].reason) == ("Running", "")
