"""The launcher and the driver against a fake API server over real HTTP (tests/k8s/fakeapi.py).

The fake has no controllers: the tests play the Job controller (conditions) and the kubelet (pods, logs),
and assert only what kubetune sends and how it reads what it gets back.
"""

from __future__ import annotations

import json

import pytest

from k8s.fakeapi import FakeCluster
from kubetune.artifacts import RunLayout
from kubetune.config import recipe_from_dict
from kubetune.errors import ArtifactError, ClusterError
from kubetune.k8s import launcher, render
from kubetune.k8s.api import KubeCluster, connect
from kubetune.k8s.driver import Driver, StageFailedError

pytestmark = pytest.mark.timeout(60)


def make_recipe(tmp_path=None, **extra):
    data = {"run": {"name": "t1"}, "model": {"name_or_path": ".cache/models/base"},
            "stages": ["finetune", "merge", "infer"], "infer": {"models": ["base", "merged"]}}
    if tmp_path is not None:
        data["run"]["artifacts_root"] = str(tmp_path / "artifacts")
        data["kubernetes"] = {"pvc": {"mount_path": str(tmp_path)}}
    data.update(extra)
    return recipe_from_dict(data)


@pytest.fixture
def fake():
    with FakeCluster("ml") as fc:
        yield fc


@pytest.fixture
def cluster(fake, tmp_path) -> KubeCluster:
    return connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")))


def stage_jobs(fake) -> dict[str, dict]:
    return {j["metadata"]["labels"][render.LABEL_STAGE]: j for j in fake.objects("Job").values()
            if render.LABEL_STAGE in j["metadata"]["labels"]}


def without_server_fields(obj: dict) -> dict:
    obj = json.loads(json.dumps(obj))
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        obj["metadata"].pop(key, None)
    return obj


# ---- submit ------------------------------------------------------------------------------------------------
def test_submit_detach_creates_the_rendered_objects_and_no_stage_job(fake, cluster):
    recipe, out = make_recipe(), []
    launcher.submit(cluster, recipe, None, "detach", out.append)
    created = {(o["kind"], o["metadata"]["name"]): without_server_fields(o)
               for kind in ("PersistentVolumeClaim", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job")
               for o in fake.objects(kind).values()}
    expected = {(o["kind"], o["metadata"]["name"]): o for o in render.base_objects(recipe, "ml")}
    assert created == expected
    assert not stage_jobs(fake)  # stage Jobs (and their GPUs) come from the driver, one at a time
    assert "kubetune status t1 -n ml" in "\n".join(out)


def test_resubmit_same_recipe_keeps_objects_and_other_recipe_is_refused(fake, cluster):
    launcher.submit(cluster, make_recipe(), None, "detach", lambda s: None)
    out = []
    launcher.submit(cluster, make_recipe(), None, "detach", out.append)
    assert "unchanged ConfigMap ml/t1-recipe" in out
    assert "exists Job ml/t1-driver (left running)" in out
    with pytest.raises(ClusterError, match="with a different recipe; `kubetune cancel t1` first"):
        launcher.submit(cluster, make_recipe(finetune={"epochs": 3}), None, "detach", lambda s: None)


def test_resubmit_retries_failed_jobs_and_restarts_a_finished_driver(fake, cluster):
    recipe = make_recipe()
    launcher.submit(cluster, recipe, None, "detach", lambda s: None)
    Driver(cluster, recipe, echo=lambda s: None).step()
    fake.finish_job("t1-finetune", ok=False)
    fake.finish_job("t1-driver", ok=False)
    out = []
    launcher.submit(cluster, recipe, None, "detach", out.append)
    assert "deleted failed Job t1-finetune (it is retried)" in out
    assert "t1-finetune" not in fake.objects("Job")
    assert "created Job ml/t1-driver" in out  # a fresh driver, with no failure conditions
    assert "status" not in fake.objects("Job")["t1-driver"]


def test_submit_one_stage_creates_only_that_job(fake, cluster):
    launcher.submit(cluster, make_recipe(), "merge", "detach", lambda s: None)
    assert set(fake.objects("Job")) == {"t1-merge"}
    assert not fake.objects("Role")


def test_server_dry_run_sends_dry_run_and_stores_nothing(fake, cluster):
    out = []
    launcher.submit(cluster, make_recipe(), None, "detach", out.append, dry_run=True)
    posts = fake.requests("post")
    assert len(posts) == len(render.base_objects(make_recipe(), "ml"))
    assert all(r.params.get("dryRun") == "All" for r in posts)
    assert not fake.objects("Job") and not fake.objects("ConfigMap")
    assert all(line.endswith("(server dry run)") for line in out)


def test_forbidden_names_the_verb_and_resource(fake, cluster):
    fake.kube.deny.add(("create", "jobs"))
    with pytest.raises(ClusterError) as err:
        launcher.submit(cluster, make_recipe(), "finetune", "detach", lambda s: None)
    message = str(err.value)
    assert message.startswith('forbidden: cannot create jobs (batch)/t1-finetune in namespace "ml"')
    assert "\n" not in message


def test_unreachable_api_server_is_one_line(tmp_path):
    with FakeCluster() as fc:
        path = fc.kubeconfig(tmp_path / "kc")
    cluster = connect(kubeconfig=str(path))  # the server has stopped: nothing listens there now
    cluster._apis["batch"].api_client.configuration.retries = 0
    with pytest.raises(ClusterError, match=r"^cannot reach the Kubernetes API to list jobs \(batch\)") as err:
        cluster.list("Job", "a=b")
    assert "\n" not in str(err.value)


# ---- the driver --------------------------------------------------------------------------------------------
def test_driver_creates_one_stage_at_a_time_and_survives_its_restart(fake, cluster):
    recipe = make_recipe()
    first = Driver(cluster, recipe, echo=lambda s: None)
    assert first.step().action == "created"
    assert set(stage_jobs(fake)) == {"finetune"}
    assert first.step().action == "waiting"  # the finetune Job runs; nothing else may hold a GPU
    assert set(stage_jobs(fake)) == {"finetune"}

    fake.finish_job("t1-finetune")
    restarted = Driver(cluster, recipe, echo=lambda s: None)  # e.g. its pod was evicted and came back
    step = restarted.step()
    assert (step.stage, step.action) == ("merge", "created")
    assert restarted.step() .action == "waiting"
    assert len(fake.requests("post")) == 2  # no duplicate Job was attempted

    fake.finish_job("t1-merge")
    assert Driver(cluster, recipe, echo=lambda s: None).step().stage == "infer"
    fake.finish_job("t1-infer")
    assert Driver(cluster, recipe, echo=lambda s: None).step().action == "finished"
    job = stage_jobs(fake)["merge"]
    assert job["metadata"]["annotations"][render.ANN_FINGERPRINT] == recipe.fingerprint("merge")


def test_driver_run_loop_advances_as_jobs_complete(fake, cluster):
    recipe, out = make_recipe(), []

    def controller(_seconds):  # each wait: the running Job finishes, as the Job controller would report
        for stage, job in stage_jobs(fake).items():
            if "status" not in job:
                fake.finish_job(job["metadata"]["name"])

    Driver(cluster, recipe, echo=out.append).run(poll_s=0, sleep=controller)
    assert out == ["finetune: Job ml/t1-finetune created", "finetune: running", "finetune: succeeded",
                   "merge: Job ml/t1-merge created", "merge: running", "merge: succeeded",
                   "infer: Job ml/t1-infer created", "infer: running", "infer: succeeded",
                   "run t1: all 3 stage(s) succeeded"]


def test_driver_stops_on_a_failed_stage(fake, cluster):
    recipe = make_recipe()
    driver = Driver(cluster, recipe, echo=lambda s: None)
    driver.step()
    fake.finish_job("t1-finetune", ok=False, reason="PodFailurePolicy",
                    message="Container stage for pod ml/t1-finetune-x failed with exit code 4")
    with pytest.raises(StageFailedError, match="stage 'finetune' failed \\(PodFailurePolicy: .*exit code 4\\)"):
        Driver(cluster, recipe, echo=lambda s: None).step()
    assert set(stage_jobs(fake)) == {"finetune"}
    assert StageFailedError.permanent  # the driver Job's podFailurePolicy then fails it at once


def test_driver_skips_stages_whose_marker_is_on_the_claim(fake, cluster, tmp_path):
    recipe = make_recipe(tmp_path)
    layout = RunLayout.from_recipe(recipe)
    out = layout.new_temp_dir("finetune")
    layout.commit("finetune", out, recipe.fingerprint("finetune"), {"stage": "finetune"})
    step = Driver(cluster, recipe, layout=layout, echo=lambda s: None).step()
    assert (step.stage, step.action) == ("merge", "created")
    assert set(stage_jobs(fake)) == {"merge"}


def test_driver_refuses_stale_markers_and_jobs_of_another_recipe(fake, cluster, tmp_path):
    recipe = make_recipe(tmp_path)
    layout = RunLayout.from_recipe(recipe)
    layout.commit("finetune", layout.new_temp_dir("finetune"), "someone-elses", {})
    with pytest.raises(ArtifactError, match="finished by a different recipe"):
        Driver(cluster, recipe, layout=layout, echo=lambda s: None).step()

    Driver(cluster, make_recipe(), echo=lambda s: None).step()
    changed = make_recipe(finetune={"epochs": 2})
    with pytest.raises(ArtifactError, match="Job t1-finetune was made for a different recipe"):
        Driver(cluster, changed, echo=lambda s: None).step()


def test_kueue_jobs_are_created_suspended_and_shown_queued(fake, cluster):
    recipe = make_recipe(kubernetes={"queue": "gpu-queue"})
    out = []
    Driver(cluster, recipe, echo=out.append).step()
    job = stage_jobs(fake)["finetune"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert Driver(cluster, recipe, echo=out.append).step().action == "queued"
    launcher.apply(cluster, [render.recipe_configmap(recipe, "ml")], recipe, lambda s: None)
    rows = {r.stage: r for r in launcher.status_rows(cluster, "t1")}
    assert rows["finetune"].phase == "Queued"


# ---- status, logs, cancel, list ----------------------------------------------------------------------------
def _pipeline_with_pods(fake, cluster):
    recipe = make_recipe()
    launcher.submit(cluster, recipe, None, "detach", lambda s: None)
    driver = Driver(cluster, recipe, echo=lambda s: None)
    driver.step()
    jobs = stage_jobs(fake)
    summary = json.dumps({"kubetune": 1, "stage": "finetune", "duration_s": 750.0,
                          "peak_vram_bytes": 21 * 2**30, "host_rss_bytes": 2**30})
    fake.add_pod(jobs["finetune"], "t1-finetune-a1b2c", phase="Succeeded", log="step 1\nstep 2\ndone\n",
                 terminated={"exitCode": 0, "reason": "Completed", "message": summary})
    fake.finish_job("t1-finetune")
    driver.step()
    return recipe


def test_status_reports_phase_pod_node_gpu_duration_and_peak_vram(fake, cluster):
    _pipeline_with_pods(fake, cluster)
    fake.add_pod(stage_jobs(fake)["merge"], "t1-merge-zz9", phase="Pending", waiting_reason="ImagePullBackOff")
    fake.start_job("t1-merge")
    rows = {r.stage: r for r in launcher.status_rows(cluster, "t1")}
    assert list(rows) == ["driver", "finetune", "merge", "infer"]
    ft = rows["finetune"]
    assert (ft.phase, ft.pod, ft.node, ft.gpu) == ("Succeeded", "t1-finetune-a1b2c", "gpu-node-1", "1× nvidia.com/gpu")
    assert (ft.duration, ft.peak_vram) == ("12m30s", "21.0 GiB")
    assert rows["merge"].phase == "Pending" and rows["merge"].reason.startswith("ImagePullBackOff")
    assert rows["infer"].phase == "not started"
    text = "\n".join(launcher.format_rows(list(rows.values())))
    assert "merge: ImagePullBackOff: back-off pulling" in text


def test_status_reports_unschedulable_and_the_log_tail_of_a_crash(fake, cluster):
    _pipeline_with_pods(fake, cluster)
    merge = stage_jobs(fake)["merge"]
    fake.add_pod(merge, "t1-merge-1", phase="Failed",
                 terminated={"exitCode": 137, "reason": "OOMKilled", "message": "loading shards\nKilled"})
    fake.add_pod(merge, "t1-merge-2", phase="Pending",
                 scheduled_message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")
    fake.patch("Pod", "t1-merge-2", {"metadata": {"creationTimestamp": "2099-01-01T00:00:00Z"}})
    rows = {r.stage: r for r in launcher.status_rows(cluster, "t1")}
    assert rows["merge"].pod == "t1-merge-2"
    assert rows["merge"].reason == "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."


def test_logs_print_and_follow_a_pod_that_starts_later(fake, cluster):
    _pipeline_with_pods(fake, cluster)
    lines = list(launcher.stream_logs(cluster, render.selector("t1", "finetune"), False, 0, lambda s: None,
                                      lambda s: None))
    assert lines == ["step 1", "step 2", "done"]
    with pytest.raises(ClusterError, match="no log yet: waiting for the stage to start"):
        list(launcher.stream_logs(cluster, render.selector("t1", "merge"), False, 0, lambda s: None, print))

    notes = []

    def kubelet(_seconds):  # while the command waits, the pod is scheduled and starts
        fake.add_pod(stage_jobs(fake)["merge"], "t1-merge-q", phase="Running", log="merging\nverified\n")

    lines = list(launcher.stream_logs(cluster, render.selector("t1", "merge"), True, 0, kubelet, notes.append))
    assert lines == ["merging", "verified"]
    assert notes == ["waiting for the stage to start (no pod yet)"]
    assert fake.requests("get", "/pods/t1-merge-q/log")[-1].params.get("follow") == "true"


def test_cancel_deletes_driver_first_with_propagation_and_keeps_the_claim(fake, cluster):
    _pipeline_with_pods(fake, cluster)
    out = []
    launcher.cancel(cluster, "t1", out.append)
    deletes = fake.requests("delete", "/jobs/")
    assert deletes[0].url.path.endswith("/jobs/t1-driver")
    assert {r.url.path.rsplit("/", 1)[1] for r in deletes} == {"t1-driver", "t1-finetune", "t1-merge"}
    assert all(r.params.get("propagationPolicy") == "Background" for r in deletes)
    assert not fake.objects("Job") and not fake.objects("ConfigMap") and not fake.objects("Role")
    assert set(fake.objects("PersistentVolumeClaim")) == {"t1-data"}
    assert out[-1] == "run t1 cancelled; its artifacts stay on the claim"
    with pytest.raises(ClusterError, match="no run 't1'"):
        launcher.cancel(cluster, "t1", out.append)


def test_list_shows_each_run_and_its_progress(fake, cluster):
    _pipeline_with_pods(fake, cluster)
    other = make_recipe(run={"name": "t2"})
    Driver(cluster, other, echo=lambda s: None).step()
    fake.finish_job("t2-finetune", ok=False)
    lines = launcher.list_runs(cluster)
    assert lines[0].split() == ["RUN", "STAGES", "DONE", "NOW", "STATE"]
    assert lines[1].split() == ["t1", "1", "merge", "running"]
    assert lines[2].split() == ["t2", "0", "finetune", "failed"]


def test_submit_follow_streams_each_stage_while_the_driver_runs_them(fake, cluster):
    recipe, out = make_recipe(stages=["finetune", "merge"], infer={"models": ["base"]}), []
    in_cluster_driver = Driver(cluster, recipe, echo=lambda s: None)  # stands in for the driver pod

    def world(_seconds):  # between two looks: the driver acts, the kubelet runs a pod, the Job completes
        in_cluster_driver.step()
        for stage, job in stage_jobs(fake).items():
            pod = f"t1-{stage}-p"
            if pod not in fake.objects("Pod"):
                fake.add_pod(job, pod, phase="Succeeded", log=f"{stage} working\n{stage} done\n",
                             terminated={"exitCode": 0, "reason": "Completed"})
                fake.finish_job(job["metadata"]["name"])

    launcher.submit(cluster, recipe, None, "follow", out.append, poll_s=0, sleep=world)
    assert "created Job ml/t1-driver" in out
    tail = out[out.index("── finetune ──"):]
    assert tail == ["── finetune ──", "finetune working", "finetune done", "finetune: succeeded",
                    "── merge ──", "merge working", "merge done", "merge: succeeded"]
