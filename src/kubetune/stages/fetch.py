"""fetch: the recipe's hub model and hub data set, downloaded into the claim's caches before any GPU is asked for.

On Kubernetes this is the pipeline's first Job when the recipe names the hub (kubetune.sources.pod_stages): a CPU
pod with HF_HOME on the claim. Every stage after it runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, so a
GPU never waits on the network and a run never reads a newer model than the one fetched. The model's revision
(a branch or tag, or the recipe's pinned commit) is resolved to the commit that was downloaded, and the report
records it; the data set is loaded once with the stages' own loader (kubetune.data), which leaves the prepared
copy that the offline stages read, and its commit is recorded too.

The hub is wherever huggingface_hub looks: ``HF_ENDPOINT`` (a mirror), ``HF_TOKEN``, proxies and CA bundles from
``kubernetes.env``/``env_from``/``extra_volumes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.errors import DataError, HubError, ModelError
from kubetune.sources import hub_sources

# Weight formats that no stage loads: never downloaded. Pickles (.bin) only when model.allow_pickle; of several
# GGUF files only model.gguf_file.
UNUSED_WEIGHTS = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.mlmodel", "onnx/*",
                  "openvino/*", "coreml/*"]
PICKLES = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
GGUF_COMPANIONS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.py"]  # config and tokenizer beside a .gguf


def _hub_error(exc: Exception, what: str, field: str, permanent_error: type) -> Exception:
    """A hub answer that retrying cannot change (no such repo or revision, gated) is the recipe's fault;
    anything else (connection, 5xx) is worth the Job's retry."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, RevisionNotFoundError):
        return permanent_error(f"{field}: {what}: the hub has no such revision ({first})")
    if isinstance(exc, GatedRepoError):
        return permanent_error(f"{field}: {what} is gated: accept its licence on the hub and give the run a token "
                               "(kubernetes.hf_token_secret)")
    if isinstance(exc, RepositoryNotFoundError):
        return permanent_error(f"{field}: {what}: no such repository on the hub (or it is private: set "
                               "kubernetes.hf_token_secret)")
    return HubError(f"{what}: the hub could not be read ({type(exc).__name__}: {first}); the Job retries")


def _weights_patterns(model) -> dict[str, list[str]]:
    if model.gguf_file:
        return {"allow_patterns": [model.gguf_file, *GGUF_COMPANIONS]}
    return {"ignore_patterns": UNUSED_WEIGHTS + ([] if model.allow_pickle else PICKLES) + ["*.gguf"]}


def fetch_model(model, repo_id: str) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=model.revision, **_weights_patterns(model)))
    except Exception as exc:
        raise _hub_error(exc, repo_id, "model.name_or_path", ModelError) from None
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"repo_id": repo_id, "revision": model.revision or "main", "commit": folder.name,
            "files": len(files), "bytes": sum(p.stat().st_size for p in files), "path": str(folder)}


def fetch_dataset(data, repo_id: str) -> dict[str, Any]:
    from huggingface_hub import HfApi

    from kubetune.data import load_examples

    try:
        commit = HfApi().dataset_info(repo_id).sha  # first: the rows loaded below are this commit's or newer
    except Exception as exc:
        raise _hub_error(exc, repo_id, "data.source", DataError) from None
    rows = len(load_examples(data))  # the stages' own loader: it leaves the prepared copy they read offline
    return {"repo_id": repo_id, "split": data.split, "commit": commit, "rows": rows}


def run(ctx) -> dict:
    recipe, fetched = ctx.recipe, {}
    wanted = hub_sources(recipe)
    if Path(recipe.model.name_or_path).expanduser().is_dir():  # a claim folder with a hub-like name: no download
        wanted.pop("model", None)
    for i, (what, repo_id) in enumerate(wanted.items()):
        ctx.progress(ctx.stage, i, len(wanted), f"{what} {repo_id}")
        fetched[what] = (fetch_model(recipe.model, repo_id) if what == "model"
                         else fetch_dataset(recipe.data, repo_id))
    ctx.progress(ctx.stage, len(wanted), len(wanted), "fetched")
    (ctx.out / "sources.json").write_text(json.dumps(fetched, indent=2) + "\n", encoding="utf-8")
    return {"sources": fetched}
