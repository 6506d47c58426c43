"""The prompt contract at serving time: a finished run's model answers a question and a schema as the evaluation
asked it. Used by ``kubetune serve`` (:mod:`kubetune.serve`) and by ``kubetune render --serve``; it imports
nothing outside the standard library, :mod:`kubetune.prompt` and :mod:`kubetune.k8s.gojson`, because :class:`PromptMiddleware` runs inside the
vLLM server's process, in vLLM's own environment (docs/serving.md says why it is not kubetune's).

Two ways in, both giving the exact prompt the infer stage built for the same row:

* ``POST /v1/completions`` with ``question`` and ``context`` (the schema) instead of ``prompt``:
  :class:`PromptMiddleware` formats them with the model's saved template and, unless the request says
  otherwise, answers greedily, stops where the infer stage cuts the SQL (:data:`SQL_STOP`) and caps the answer at
  ``infer.max_new_tokens``. A request with a ``prompt`` passes untouched.
* ``POST /v1/chat/completions`` with the schema as the system message and the question as the user message:
  :func:`chat_template` is the template as a Jinja chat template, handed to vLLM with ``--chat-template``.
"""

from __future__ import annotations

import json
import os
import string

from kubetune.k8s import gojson
from kubetune.prompt import PromptTemplate

# kubetune.stages.infer.sql_end as stop strings: a blank line, a line starting with '#', or ';'. (A "blank" line
# of only spaces is the one case the infer stage cuts and these do not.)
SQL_STOP = ["\n\n", "\n#", ";"]
ENV_PROMPT_FILE = "KUBETUNE_PROMPT_FILE"
ENV_MAX_TOKENS = "KUBETUNE_MAX_NEW_TOKENS"
COMPLETIONS_PATH = "/v1/completions"


def chat_template(template: str) -> str:
    """A one-line Jinja chat template that renders [system: schema, user: question] as ``template`` does (both
    stripped, as :meth:`PromptTemplate.format` does); vLLM's ``--chat-template`` takes it inline."""
    parts = [
        "{%- set ns = namespace(context='', question='') -%}",
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.context = m['content'] -%}",
        "{%- elif m['role'] == 'user' -%}{%- set ns.question = m['content'] -%}{%- endif -%}{%- endfor -%}",
    ]
    literal = ""
    for text, field, _, _ in string.Formatter().parse(template):
        literal += text  # Formatter splits the text at each {{ or }}: one Jinja string per run of text
        if field is not None:
            if literal:
                # a JSON string is a valid Jinja string literal; Go's escapes, so that the chart writes the same
                parts.append("{{ " + gojson.dumps(literal) + " }}")
            literal = ""
            parts.append(f"{{{{ ns.{field} | trim }}}}")
    if literal:
        parts.append("{{ " + gojson.dumps(literal) + " }}")
    return "".join(parts)


def completion_request(body: dict, template: PromptTemplate, max_tokens: int) -> dict:
    """A /v1/completions body with ``question``/``context`` made into the prompt the evaluation used."""
    if "prompt" in body or "question" not in body:
        return body
    body = dict(body)
    body["prompt"] = template.format(str(body.pop("context", "") or ""), str(body.pop("question")))
    body.setdefault("temperature", 0.0)  # greedy, as infer.greedy
    body.setdefault("max_tokens", max_tokens)
    body.setdefault("stop", SQL_STOP)
    return body


class PromptMiddleware:
    """ASGI middleware for vLLM's OpenAI server (``vllm serve --middleware kubetune.serving.PromptMiddleware``):
    rewrites /v1/completions bodies with :func:`completion_request`. The template comes from the file named by
    ``KUBETUNE_PROMPT_FILE`` (the model folder's kubetune_prompt.json), the cap from ``KUBETUNE_MAX_NEW_TOKENS``."""

    def __init__(self, app):
        from pathlib import Path

        self.app = app
        path = Path(os.environ[ENV_PROMPT_FILE])
        self.template = PromptTemplate.load(path.parent) if path.name else None
        if self.template is None:
            raise RuntimeError(f"{path}: no prompt template")
        self.max_tokens = int(os.environ.get(ENV_MAX_TOKENS, "128"))

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != COMPLETIONS_PATH:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            body = json.dumps(completion_request(data, self.template, self.max_tokens)).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # e.g. http.disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class ServedModel:
    """A model behind an OpenAI-compatible server (``kubetune serve``, a KServe InferenceService): the compare UI
    asks it as the evaluation asks a local model, through /v1/chat/completions and the chat template the server
    was given (schema as the system message, question as the user message), greedy, with :data:`SQL_STOP`."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout_s = timeout_s
        self.name = self._call("GET", "/v1/models")["data"][0]["id"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConnectionError(f"{self.url}{path}: {getattr(exc, 'reason', exc)}") from None

    def answer(self, context: str, question: str, max_tokens: int) -> tuple[str, int]:
        """(the answer's text, tokens generated)."""
        reply = self._call("POST", "/v1/chat/completions", {
            "model": self.name, "temperature": 0.0, "max_tokens": max_tokens, "stop": SQL_STOP,
            "messages": [{"role": "system", "content": context}, {"role": "user", "content": question}]})
        return reply["choices"][0]["message"]["content"], int((reply.get("usage") or {}).get("completion_tokens", 0))
