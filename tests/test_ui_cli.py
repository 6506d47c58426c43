"""`kubetune ui` settings reach the server: flags, KUBETUNE_UI_* variables and Cloudera ML's port. The server
itself is replaced here (it is served for real in test_ui_browser.py); the run is a real tiny one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.cli import cli
from test_ui_backend import tiny_ui_run


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_ui_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture
def served(monkeypatch):
    """Calls of kubetune.ui.app.launch: (models of the run, examples, bind, auth)."""
    import kubetune.ui.app

    calls = []
    monkeypatch.setattr(kubetune.ui.app, "launch",
                        lambda pool, examples, bind, auth: calls.append((pool.info.models, len(examples), bind, auth)))
    for name in ("CDSW_APP_PORT", "CDSW_READONLY_PORT", "KUBETUNE_UI_HOST", "KUBETUNE_UI_PORT", "KUBETUNE_UI_AUTH"):
        monkeypatch.delenv(name, raising=False)
    return calls


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["ui", *args], env=env, catch_exceptions=False)


def test_flags_and_their_variables(run_root, served):
    result = invoke("tiny", "--artifacts-root", str(run_root), "--host", "0.0.0.0", "--port", "9001",
                    "--auth", "ana:pw")
    assert result.exit_code == 0, result.output
    models, examples, bind, auth = served[-1]
    assert models == ("base", "adapter", "merged") and examples == 8
    assert (bind.host, bind.port, auth) == ("0.0.0.0", 9001, ("ana", "pw"))
    assert "serving on http://0.0.0.0:9001 (port from --port); login required" in result.output

    result = invoke("tiny", env={"KUBETUNE_UI_ARTIFACTS_ROOT": str(run_root), "KUBETUNE_UI_PORT": "9002",
                                 "KUBETUNE_UI_AUTH": "bo:x:y", "KUBETUNE_UI_EXAMPLES": "3"})
    assert result.exit_code == 0, result.output
    _, examples, bind, auth = served[-1]
    assert (bind.host, bind.port, auth, examples) == ("127.0.0.1", 9002, ("bo", "x:y"), 3)


def test_cloudera_ml_needs_no_flags(run_root, served):
    result = invoke(env={"KUBETUNE_UI_ARTIFACTS_ROOT": str(run_root), "CDSW_APP_PORT": "8100",
                         "CDSW_READONLY_PORT": "8200"})
    assert result.exit_code == 0, result.output
    _, _, bind, auth = served[-1]
    assert (bind.host, bind.port, bind.source, auth) == ("127.0.0.1", 8100, "CDSW_APP_PORT", None)


def test_bad_settings_and_missing_runs_are_one_line_errors(run_root, served):
    bad_auth = invoke("tiny", "--artifacts-root", str(run_root), "--auth", "nopassword")
    assert bad_auth.exit_code == 2 and "USER:PASSWORD" in bad_auth.output
    missing = invoke("nope", "--artifacts-root", str(run_root))
    assert missing.exit_code != 0 and "error: run 'nope': neither a folder nor a run" in missing.output
    assert "Traceback" not in missing.output and served == []
