"""``kubetune serve RUN --model merged|quantized``: a finished run's model behind vLLM's OpenAI-compatible server.

vLLM is not a dependency of kubetune: no vLLM release installs next to kubetune's pins (0.31/0.32 pin torch 2.13.0
but cap transformers below 5.18/5.20; 0.33/0.34 pin torch 2.14.0), so it lives in its own environment or image,
and this module runs its ``vllm`` program (``--vllm``, ``KUBETUNE_VLLM`` or PATH). :func:`server_plan` decides the
program's arguments and environment; :func:`exec_server` replaces this process with it.

The model folder's saved prompt template is applied twice over (:mod:`kubetune.serving`): inline as the chat
template, and by :class:`~kubetune.serving.PromptMiddleware` for /v1/completions requests that send
``question`` and ``context``; the middleware is imported by vLLM's process from this package's folder, which goes
on its PYTHONPATH through a folder of its own (:func:`package_path`; the module needs nothing but the standard
library).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kubetune.config import MODEL_PRODUCERS
from kubetune.errors import ArtifactError, MissingProgramError
from kubetune.k8s.gojson import go_number  # the chart writes the same number
from kubetune.prompt import PROMPT_FILE, template_for
from kubetune.serving import ENV_MAX_TOKENS, ENV_PROMPT_FILE, chat_template

VLLM_RELEASE = "0.32.0"  # the last vLLM whose torch pin (2.13.0) is the project's; docs/serving.md


@dataclass(frozen=True)
class ServerPlan:
    model_dir: Path
    served_name: str
    argv: list[str]
    env: dict[str, str]
    """Variables added to this process's environment for the server."""


def served_name(recipe, which: str) -> str:
    return f"{recipe.run.name}-{which}"


def max_model_len(recipe) -> int:
    """What the evaluation needed: the longest training row plus the longest answer."""
    return recipe.serve.max_model_len or recipe.finetune.max_length + recipe.infer.max_new_tokens


def engine_args(recipe, which: str, template: str) -> list[str]:
    """``vllm serve`` options that decide how the model answers, shared by the local server and the cluster's
    (KServe's runtime adds the model path and the port itself)."""
    serve = recipe.serve
    args = ["--served-model-name", served_name(recipe, which), "--max-model-len", str(max_model_len(recipe)),
            "--gpu-memory-utilization", go_number(serve.gpu_memory_utilization), "--chat-template", chat_template(template)]
    if which == "merged":
        args += ["--dtype", recipe.merge.dtype]  # GPTQ: vLLM picks the dtype its kernel needs
    if recipe.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args + list(serve.extra_args)


def find_vllm(program: str | None) -> str:
    program = program or os.environ.get("KUBETUNE_VLLM") or "vllm"
    found = shutil.which(program)
    if found is None:
        raise MissingProgramError(
            f"vLLM is not installed ({program!r} not found): install vllm=={VLLM_RELEASE} in its own environment "
            "and pass --vllm PATH/bin/vllm (docs/serving.md)")
    return found


def server_plan(recipe, layout, which: str, host: str = "127.0.0.1", port: int | None = None,
                vllm: str | None = None) -> ServerPlan:
    """The program, arguments and environment that serve ``which`` (merged | quantized) of a finished run."""
    model_dir = layout.require(MODEL_PRODUCERS[which])
    template = template_for(model_dir, recipe)  # the one it was trained with; a mismatch is refused here too
    port = port or recipe.serve.port
    argv = [find_vllm(vllm), "serve", str(model_dir), *engine_args(recipe, which, template.template),
            "--port", str(port), "--host", host, "--middleware", "kubetune.serving.PromptMiddleware"]
    pythonpath = os.pathsep.join(p for p in (str(package_path()), os.environ.get("PYTHONPATH", "")) if p)
    env = {ENV_PROMPT_FILE: str(model_dir / PROMPT_FILE), ENV_MAX_TOKENS: str(recipe.infer.max_new_tokens),
           "PYTHONPATH": pythonpath}
    if not (model_dir / PROMPT_FILE).is_file():  # merge and quantize always write it
        raise ArtifactError(f"{model_dir / PROMPT_FILE}: missing; the model's prompt template cannot be applied")
    return ServerPlan(model_dir, served_name(recipe, which), argv, env)


def package_path() -> Path:
    """A folder holding only ``kubetune`` (a link to this package), for vLLM's PYTHONPATH: the folder that holds the
    package may be a site-packages whose torch and transformers would shadow vLLM's own."""
    import hashlib
    import tempfile

    package = Path(__file__).resolve().parent
    folder = Path(tempfile.gettempdir()) / (
        f"kubetune-serve-{os.getuid()}-{hashlib.sha256(str(package).encode()).hexdigest()[:12]}")
    folder.mkdir(mode=0o700, exist_ok=True)
    link = folder / "kubetune"
    if not link.is_symlink() or link.resolve() != package:
        link.unlink(missing_ok=True)
        link.symlink_to(package, target_is_directory=True)
    return folder


def exec_server(plan: ServerPlan) -> None:
    """Replace this process with the server (signals and the exit status are vLLM's own)."""
    os.execve(plan.argv[0], plan.argv, {**os.environ, **plan.env})
