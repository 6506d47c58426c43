"""A run's Jobs over their lifetime, against the fake API server: the TTL starts when the run ends (never per
stage), the driver's Job owns the stage Jobs so that deleting it (TTL, `helm uninstall`, `kubetune cancel`)
removes them, and the driver Job is labelled for Kueue.

The fake has no controllers; the tests play the two that matter here, from their documented behaviour: the
TTL-after-finished controller (a finished Job with ttlSecondsAfterFinished: 0 is deleted at once) and the
garbage collector (a Job whose owner is gone is deleted, with background propagation).
"""

from __future__ import annotations

import pytest

from k8s.fakeapi import FakeCluster
from kubetune.config import recipe_from_dict
from kubetune.k8s import launcher, render
from kubetune.k8s.api import connect
from kubetune.k8s.driver import Driver
from kubetune.k8s.state import job_state

pytestmark = pytest.mark.timeout(60)


def make_recipe(**kubernetes):
    return recipe_from_dict({"run": {"name": "t1"}, "model": {"name_or_path": "org/model"},
                             "stages": ["finetune", "merge", "infer"], "infer": {"models": ["base", "merged"]},
                             "kubernetes": kubernetes})


@pytest.fixture
def fake():
    with FakeCluster("ml") as fc:
        yield fc


@pytest.fixture
def cluster(fake, tmp_path):
    return connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")))


def ttl_controller(fake) -> None:
    """ttlSecondsAfterFinished: 0 deletes a Job as soon as it has finished."""
    for name, job in fake.objects("Job").items():
        if job_state(job)[0] in ("done", "failed") and job["spec"].get("ttlSecondsAfterFinished") == 0:
            fake.delete("Job", name)


def garbage_collector(fake) -> None:
    """Jobs whose every owner is gone are deleted."""
    uids = {job["metadata"]["uid"] for job in fake.objects("Job").values()}
    for name, job in fake.objects("Job").items():
        owners = job["metadata"].get("ownerReferences") or []
        if owners and not any(o["uid"] in uids for o in owners):
            fake.delete("Job", name)


def stage_creations(fake) -> list[str]:
    return [r.data["metadata"]["name"] for r in fake.requests("post", "/jobs")
            if r.data["metadata"]["name"] != "t1-driver"]


def test_ttl_zero_on_a_read_write_once_claim_does_not_recreate_finished_stages(fake, cluster):
    """Issue 18: with the TTL on each stage Job, finetune was deleted as it finished and, the markers being
    unreadable on a ReadWriteOnce claim, made again on every pass; merge was never reached."""
    recipe = make_recipe(ttl_after_finished_s=0)  # ReadWriteOnce: the driver cannot read the markers
    launcher.submit(cluster, recipe, None, "detach", lambda s: None)
    driver = Driver(cluster, recipe, echo=lambda s: None, owner=cluster.get("Job", "t1-driver"))
    finished = False
    for _ in range(12):  # three stages need 6 passes; a livelock would use them all
        if driver.step().stage is None:
            finished = True
            break
        for name, job in fake.objects("Job").items():  # the Job controller: a running stage finishes
            if name != "t1-driver" and "status" not in job:
                fake.finish_job(name)
        ttl_controller(fake)
    assert finished, f"the driver never finished; stage Jobs created: {stage_creations(fake)}"
    assert stage_creations(fake) == ["t1-finetune", "t1-merge", "t1-infer"]
    # the run's TTL is the driver Job's: it starts when the driver finishes, and takes the stage Jobs along
    assert fake.objects("Job")["t1-driver"]["spec"]["ttlSecondsAfterFinished"] == 0


def test_stage_jobs_are_owned_by_the_driver_job_and_go_with_it(fake, cluster):
    recipe = make_recipe()
    launcher.submit(cluster, recipe, None, "detach", lambda s: None)
    owner = cluster.get("Job", "t1-driver")
    Driver(cluster, recipe, echo=lambda s: None, owner=owner).step()
    finetune = fake.objects("Job")["t1-finetune"]
    # no controller: true (Kueue would take the stage for part of the driver's workload and never admit it),
    # no blockOwnerDeletion (it needs jobs/finalizers rights)
    assert finetune["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "t1-driver", "uid": owner["metadata"]["uid"]}]
    fake.delete("Job", "t1-driver")  # its TTL, or `helm uninstall` (background propagation)
    garbage_collector(fake)
    assert fake.objects("Job") == {}


def test_a_driver_without_a_job_of_its_own_starts_the_ttl_when_the_run_ends(fake, cluster):
    recipe = make_recipe(ttl_after_finished_s=3600)

    def controller(_seconds):
        for name, job in fake.objects("Job").items():
            assert "ttlSecondsAfterFinished" not in job["spec"], "a TTL while the run goes on"
            if "status" not in job:
                fake.finish_job(name)

    Driver(cluster, recipe, echo=lambda s: None).run(poll_s=0, sleep=controller)  # `submit --wait`
    jobs = fake.objects("Job")
    assert set(jobs) == {"t1-finetune", "t1-merge", "t1-infer"}
    assert {job["spec"].get("ttlSecondsAfterFinished") for job in jobs.values()} == {3600}


def test_one_stage_watched_from_here_gets_its_ttl_when_it_ends(fake, cluster):
    """`submit --stage S --wait` with ttl 0 used to lose its Job to the TTL before it saw it succeed."""
    recipe, out = make_recipe(ttl_after_finished_s=0), []

    def controller(_seconds):
        fake.finish_job("t1-merge")
        ttl_controller(fake)

    launcher.submit(cluster, recipe, "merge", "wait", out.append, poll_s=0, sleep=controller)
    assert out[-1] == "Job t1-merge succeeded"
    assert fake.objects("Job")["t1-merge"]["spec"]["ttlSecondsAfterFinished"] == 0
    detached = render.render(recipe, "ml", stage="merge")[-1]  # nobody watches it: it carries the TTL itself
    assert detached["spec"]["ttlSecondsAfterFinished"] == 0


def test_cancel_removes_what_the_driver_made_even_when_the_collector_was_first(fake, cluster):
    recipe = make_recipe()
    launcher.submit(cluster, recipe, None, "detach", lambda s: None)
    Driver(cluster, recipe, echo=lambda s: None, owner=cluster.get("Job", "t1-driver")).step()

    class CollectingCluster:  # the garbage collector deletes the owned Jobs as soon as their owner is gone
        namespace = cluster.namespace

        def __getattr__(self, name):
            return getattr(cluster, name)

        def delete(self, kind, name):
            cluster.delete(kind, name)
            garbage_collector(fake)

    out = []
    launcher.cancel(CollectingCluster(), "t1", out.append)
    assert fake.objects("Job") == {} and fake.objects("Role") == {}
    assert out[-1] == "run t1 cancelled; its artifacts stay on the claim"


def test_the_driver_job_carries_the_kueue_queue_label():
    job = render.driver_job(make_recipe(queue="team-gpus"), "ml")
    assert job["metadata"]["labels"][render.KUEUE_QUEUE_LABEL] == "team-gpus" and job["spec"]["suspend"] is True
    plain = render.driver_job(make_recipe(), "ml")
    assert render.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"] and "suspend" not in plain["spec"]
