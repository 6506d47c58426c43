"""Permissions, from what kubetune actually asks of the API server: every request the in-cluster driver and the
laptop commands (`submit`, `status`, `logs`, `cancel`) send to the fake API server is recorded as
(API group, resource, verb) and compared with the driver's Role (render.DRIVER_RULES) and with the Role a
person needs (render.USER_RULES, docs/kubernetes.md). A verb the code stops using, or starts using, fails here.
"""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from k8s.fakeapi import FakeCluster
from kubetune.cli import cli
from kubetune.k8s import render

pytestmark = pytest.mark.timeout(60)
RECIPE = """
run: {name: rb1}
model: {name_or_path: org/model}
stages: [finetune, merge]
kubernetes: {ttl_after_finished_s: 60, image: registry.example/kubetune:1}
"""
VERBS = {"post": "create", "delete": "delete", "patch": "patch", "put": "update"}


def permission(request) -> tuple[str, str, str]:
    """/apis/batch/v1/namespaces/ml/jobs/x → ("batch", "jobs", "get"); /api/v1/…/pods/p/log → ("", "pods/log", "get")."""
    parts = request.url.path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces", f"a request outside the namespace: {request.url.path}"
    resource, named = rest[2], len(rest) > 3
    if len(rest) > 4:
        resource += "/" + rest[4]
    method = request.method.value.lower()
    if method == "get":
        verb = "watch" if request.params.get("watch") else "get" if named else "list"
    else:
        verb = VERBS[method]
    return group, resource, verb


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def used(fake, since: int) -> set[tuple[str, str, str]]:
    return {permission(r) for r in fake.requests()[since:]}


def finish_jobs(fake, stop: threading.Event) -> None:
    """The Job controller: every stage Job succeeds as soon as it exists."""
    while not stop.wait(0.05):
        for name, job in fake.objects("Job").items():
            if name != "rb1-driver" and "status" not in job:
                fake.finish_job(name)


def with_jobs_finishing(fake, args: list[str]):
    stop = threading.Event()
    thread = threading.Thread(target=finish_jobs, args=(fake, stop), daemon=True)
    thread.start()
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def fake():
    with FakeCluster("ml") as fc:
        yield fc


def test_the_driver_role_is_exactly_what_the_driver_uses(fake, tmp_path):
    kc = ["--kubeconfig", str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert CliRunner().invoke(cli, ["submit", str(recipe), *kc]).exit_code == 0  # detach: the driver's Job
    before = len(fake.requests())
    # what the driver pod runs (its args in render.driver_job), here over the fake server
    result = with_jobs_finishing(fake, ["drive", "rb1", "--recipe", str(recipe), "--poll", "0.05", *kc])
    assert result.exit_code == 0, result.output
    driver_calls = used(fake, before)
    role = granted(render.DRIVER_RULES)
    assert driver_calls <= role, f"the driver needs {sorted(driver_calls - role)}, which its Role lacks"
    unused = role - driver_calls - render.DRIVER_ADMISSION_VERBS
    assert not unused, f"the Role grants {sorted(unused)}, which the driver never uses"


def test_the_user_role_is_exactly_what_the_commands_use(fake, tmp_path):
    kc = ["--kubeconfig", str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run = lambda *args: CliRunner().invoke(cli, [*args, *kc], catch_exceptions=False)  # noqa: E731
    assert run("submit", str(recipe)).exit_code == 0
    assert run("submit", str(recipe)).exit_code == 0  # again: the recipe is compared, nothing duplicated
    assert with_jobs_finishing(fake, ["submit", str(recipe), "--wait", "--poll", "0.05", *kc]).exit_code == 0
    assert run("submit", str(recipe), "--stage", "merge").exit_code == 0
    fake.add_pod(fake.objects("Job")["rb1-merge"], "rb1-merge-x1", phase="Succeeded", log="merged\n")
    assert run("status", "rb1").exit_code == 0
    assert run("logs", "rb1", "--stage", "merge").exit_code == 0
    assert run("list").exit_code == 0
    assert run("cancel", "rb1").exit_code == 0
    calls = used(fake, 0)
    rules = granted(render.USER_RULES)
    assert calls <= rules, f"the commands need {sorted(calls - rules)}, which render.USER_RULES lacks"
    assert rules <= calls, f"render.USER_RULES grants {sorted(rules - calls)}, which no command uses"
