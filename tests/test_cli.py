"""The CLI as a user meets it: one-line errors with distinct exit codes, env-var forms, no tracebacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.cli import cli
from kubetune.errors import EXIT_CODES, PERMANENT_EXIT_CODES, KubetuneError

ROOT = Path(__file__).parent.parent


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_validate_all_shipped_recipes():
    result = invoke("validate", *map(str, sorted((ROOT / "jobs").glob("*.yaml"))))
    assert result.exit_code == 0, result.output
    assert result.output.count("✓") == len(list((ROOT / "jobs").glob("*.yaml")))


def test_validate_reports_every_problem_and_exits_3(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name_or_path": "m", "typo": 1}, "finetune": {"lora": {"r": -1}}}))
    result = invoke("validate", str(bad))
    assert result.exit_code == 3
    assert "model.typo" in result.output and "finetune.lora.r" in result.output
    assert "Traceback" not in result.output


def test_set_works_on_validate_and_env_var_form(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "resources": {"merge": {"gpus": 0}}}))
    assert invoke("validate", str(good), "--set", "quantize.bits=3").exit_code == 3
    assert invoke("validate", str(good), env={"KUBETUNE_SET": "run.name=ok quantize.bits=3"}).exit_code == 3
    assert invoke("validate", str(good), "--set", "quantize.bits=4").exit_code == 0


def test_stage_with_missing_model_is_one_line_exit_5(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"artifacts_root": str(tmp_path / "a")},
                                      "model": {"name_or_path": str(tmp_path / "nope")},
                                      "resources": {"finetune": {"gpus": 0}}}))
    result = invoke("stage", "finetune", "--recipe", str(recipe))
    assert result.exit_code == 5, result.output
    assert result.output.strip().count("\n") == 0 and "model.name_or_path" in result.output
    assert not (tmp_path / "a" / "demo" / "finetune").exists()


def test_stage_needing_an_unfinished_upstream_exit_6(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"artifacts_root": str(tmp_path / "a")},
                                      "model": {"name_or_path": "m"}, "resources": {"merge": {"gpus": 0}}}))
    result = invoke("stage", "merge", "--recipe", str(recipe))
    assert result.exit_code == 6
    assert "stage 'finetune' (needed by 'merge') has not finished" in result.output


def test_run_rejects_unknown_stage_subset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "resources": {"merge": {"gpus": 0}}}))
    result = invoke("run", str(recipe), "--stages", "finetune,distill")
    assert result.exit_code == 3 and "distill" in result.output


def error_classes() -> list[type[KubetuneError]]:
    """Every error class of kubetune, subclasses of subclasses included."""
    found, todo = [], list(KubetuneError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def documented_exit_codes() -> dict[int, str]:
    """{code: podFailurePolicy column} of the table in docs/exit-codes.md."""
    rows = re.findall(r"^\| (\d+) \|.*\| ([^|]+) \|$", (ROOT / "docs" / "exit-codes.md").read_text(), re.M)
    return {int(code): policy.strip() for code, policy in rows}


def test_exit_codes_are_distinct_and_documented():
    # a subclass that keeps its parent's code (kubetune.k8s.api's NotFoundError is a ClusterError) shares it on
    # purpose; such classes exist once their module is imported, so counting them made this test order-dependent
    classes = [cls for cls in error_classes() if "exit_code" in vars(cls)]
    by_code: dict[int, list[str]] = {}
    for cls in classes:
        by_code.setdefault(cls.exit_code, []).append(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert not shared, f"one exit code for several errors: {shared}"
    assert not set(by_code) & {0, 1, 2, 137, 143}, "an error class reuses a code of success, click or a signal"
    assert set(EXIT_CODES) == {0, 1, 2} | set(by_code), "kubetune.errors.EXIT_CODES misses an error class"
    doc = documented_exit_codes()
    assert set(doc) == set(EXIT_CODES) | {137, 143}, "docs/exit-codes.md and kubetune.errors list other codes"
    permanent = {cls.exit_code for cls in classes if cls.permanent}
    assert set(PERMANENT_EXIT_CODES) == permanent, "PERMANENT_EXIT_CODES misses a permanent error class"
    assert {code for code, policy in doc.items() if "FailJob" in policy} == permanent


def test_an_arbitrary_uid_without_a_passwd_entry_still_has_a_user_name(monkeypatch):
    """OpenShift's arbitrary UIDs have no /etc/passwd line; getpass.getuser() (torch's and triton's cache folders
    on the GPU) then raised 'getpwuid(): uid not found' and stopped every GPU stage pod at its model load."""
    import getpass
    import pwd

    from kubetune import cli as cli_module

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    with pytest.raises(KeyError):
        getpass.getuser()
    cli_module._name_an_unnamed_user()
    assert getpass.getuser().startswith("uid-")
