"""`kubetune serve`: the vllm command and environment it starts, and the prompt it makes of a question and a schema
(the saved template, as the evaluation built it), all without vLLM: a fake `vllm` program records what it got."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.errors import MissingProgramError
from kubetune.prompt import PromptTemplate
from kubetune.serving import SQL_STOP, PromptMiddleware, chat_template
from tiny import tiny_recipe_dict

SRC = Path(__file__).resolve().parents[1] / "src"
TEMPLATE = "Q: {question}\nS: {context}\nA:"
SCHEMA, QUESTION = "CREATE TABLE t (a INT)", "How many rows?"
PROMPT = "Q: How many rows?\nS: CREATE TABLE t (a INT)\nA:"  # what infer's PromptTemplate.format makes of them


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run whose merge stage finished (weights are not needed: vLLM is faked)."""
    recipe = tiny_recipe_dict(Path("/nonexistent"), tmp_path / "artifacts", prompt={"template": TEMPLATE})
    recipe["run"]["name"] = "served"
    merge = tmp_path / "artifacts" / "served" / "merge"
    merge.mkdir(parents=True)
    PromptTemplate(TEMPLATE).save(merge)
    (merge / "report.json").write_text(json.dumps({"stage": "merge", "recipe": recipe}))
    (merge / "_SUCCESS").write_text(json.dumps({"fingerprint": "x"}))
    return merge.parent


def fake_vllm(folder: Path, record: Path) -> Path:
    """A `vllm` that writes its arguments, then imports the middleware as vLLM would, with the system Python (no
    kubetune installed there: only the PYTHONPATH it was given)."""
    folder.mkdir()
    program = folder / "vllm"
    program.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {record}/argv
env > {record}/env
exec /usr/bin/python3 -c 'import kubetune.serving as s; print(s.PromptMiddleware.__name__)' > {record}/import 2>&1
""")
    program.chmod(0o755)
    return program


def kubetune(*args, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PATH": path}
    env.pop("KUBETUNE_VLLM", None)
    return subprocess.run([sys.executable, "-c", "from kubetune.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_execs_vllm_with_the_model_its_template_and_the_middleware(finished_run, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    bin_dir = fake_vllm(tmp_path / "bin", record).parent
    result = kubetune("serve", str(finished_run), "--model", "merged", "--port", "8123",
                      path=f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    argv = (record / "argv").read_text().splitlines()
    assert argv[:2] == ["serve", str(finished_run / "merge")]
    options = dict(zip(argv[2::2], argv[3::2]))
    assert options["--served-model-name"] == "served-merged" and options["--port"] == "8123"
    assert options["--max-model-len"] == str(128 + 12)  # finetune.max_length + infer.max_new_tokens
    assert options["--middleware"] == "kubetune.serving.PromptMiddleware" and options["--host"] == "127.0.0.1"
    assert options["--dtype"] == "float32"  # merge.dtype of the tiny recipe
    assert options["--chat-template"] == chat_template(TEMPLATE)
    env = dict(line.split("=", 1) for line in (record / "env").read_text().splitlines() if "=" in line)
    assert env["KUBETUNE_PROMPT_FILE"] == str(finished_run / "merge" / "kubetune_prompt.json")
    assert env["KUBETUNE_MAX_NEW_TOKENS"] == "12"
    assert (record / "import").read_text().strip() == "PromptMiddleware"  # importable in vLLM's environment
    # …from a folder that holds kubetune alone, not the site-packages of kubetune's torch and transformers
    path_dir = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    assert [p.name for p in path_dir.iterdir()] == ["kubetune"]


def test_serve_refuses_in_one_line_without_vllm(finished_run):
    result = kubetune("serve", str(finished_run), path="/usr/bin:/bin")
    assert result.returncode == MissingProgramError.exit_code
    assert result.stderr.count("\n") == 1 and "vLLM is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_model_the_run_has_not_made(finished_run):
    result = kubetune("serve", str(finished_run), "--model", "quantized", "--dry-run", path="/usr/bin:/bin")
    assert result.returncode == 6 and "stage 'quantize' has not finished" in result.stderr


def asgi_call(app, path: str, body: dict) -> dict:
    """Send one POST through ``app`` and return what the inner application received."""
    seen = {}

    async def inner(scope, receive, send):
        message = await receive()
        seen["body"] = json.loads(message["body"])
        seen["length"] = dict(scope["headers"])[b"content-length"]
        seen["path"] = scope["path"]

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    raw = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(raw)).encode())]}
    asyncio.run(app(inner)(scope, receive, None))
    return seen


def test_completions_with_question_and_schema_get_the_evaluated_prompt(finished_run, monkeypatch):
    monkeypatch.setenv("KUBETUNE_PROMPT_FILE", str(finished_run / "merge" / "kubetune_prompt.json"))
    monkeypatch.setenv("KUBETUNE_MAX_NEW_TOKENS", "12")
    seen = asgi_call(PromptMiddleware, "/v1/completions",
                     {"model": "served-merged", "question": f" {QUESTION} ", "context": SCHEMA})
    assert seen["body"] == {"model": "served-merged", "prompt": PROMPT, "temperature": 0.0, "max_tokens": 12,
                            "stop": SQL_STOP}
    assert seen["length"] == str(len(json.dumps(seen["body"]).encode())).encode()
    # a request that brings its own prompt or settings keeps them; other routes pass untouched
    own = {"model": "m", "prompt": "SELECT", "max_tokens": 3}
    assert asgi_call(PromptMiddleware, "/v1/completions", own)["body"] == own
    assert asgi_call(PromptMiddleware, "/v1/completions", {"question": QUESTION, "temperature": 0.7})["body"][
        "temperature"] == 0.7
    chat = {"messages": [{"role": "user", "content": QUESTION}], "question": "x"}
    assert asgi_call(PromptMiddleware, "/v1/chat/completions", chat)["body"] == chat


def test_chat_template_renders_system_schema_and_user_question_as_the_template():
    import jinja2

    rendered = jinja2.Environment().from_string(chat_template(TEMPLATE + ' "quoted" {{braces}}')).render(
        messages=[{"role": "system", "content": SCHEMA + "\n"}, {"role": "user", "content": QUESTION}])
    assert rendered == PROMPT + ' "quoted" {braces}'
    assert "\n" not in chat_template(TEMPLATE)  # vLLM takes a one-line template inline


def test_serve_section_is_in_no_fingerprint(tmp_path):
    from kubetune.config import recipe_from_dict

    plain = recipe_from_dict(tiny_recipe_dict(tmp_path, tmp_path))
    served = recipe_from_dict(tiny_recipe_dict(tmp_path, tmp_path, serve={"model": "quantized", "replicas": 2}))
    assert all(plain.fingerprint(s) == served.fingerprint(s) for s in plain.stages)
    assert yaml.safe_dump(served.serve.model_dump())  # plain data, renderable


def test_the_compare_ui_asks_a_served_model_as_the_evaluation_does(tmp_path):
    """`kubetune ui --endpoint URL`: the served model answers over /v1/chat/completions (schema as system message,
    greedy, the SQL stop strings) and its answer is cut and judged like a local model's."""
    import http.server
    import threading

    from kubetune.ui.backend import ModelPool, ask, open_run, with_endpoint

    seen = []

    class FakeOpenAI(http.server.BaseHTTPRequestHandler):
        def _reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply({"data": [{"id": "served-merged"}]})

        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self._reply({"choices": [{"message": {"content": " SELECT count(*) FROM t\n\n# context: more"}}],
                         "usage": {"completion_tokens": 9}})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "no-model", tmp_path / "artifacts")))
        info = with_endpoint(open_run(str(recipe)), f"http://127.0.0.1:{server.server_port}/v1")
        pool = ModelPool(info)
        pool.select(["served"])  # nothing loaded here: the base model folder does not even exist
        result = ask(pool, SCHEMA, QUESTION, gold="SELECT count(*) FROM t")
    finally:
        server.shutdown()
    (answer,) = result.answers
    assert answer.sql == "SELECT count(*) FROM t" and answer.new_tokens == 9 and answer.execution.passed is True
    assert answer.label == f"served: served-merged at http://127.0.0.1:{server.server_port}"
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "served-merged"
    assert body["messages"] == [{"role": "system", "content": SCHEMA}, {"role": "user", "content": QUESTION}]
    assert body["temperature"] == 0.0 and body["stop"] == SQL_STOP and body["max_tokens"] == 12


def test_an_endpoint_without_a_server_is_one_line(tmp_path):
    from kubetune.errors import ArtifactError
    from kubetune.ui.backend import open_run, with_endpoint

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "no-model", tmp_path / "artifacts")))
    with pytest.raises(ArtifactError, match="no OpenAI-compatible server"):
        with_endpoint(open_run(str(recipe)), "http://127.0.0.1:9")
