"""Bad inputs, one test each: what a user (or a cluster) can get wrong, through the CLI a pod or a laptop runs.

Every case checks the same contract: one ``error:`` line that names the problem, the exit code that
docs/exit-codes.md documents for it (the stage Jobs' podFailurePolicy acts on that code), no traceback, and
nothing already written lost: a finished run ("keep": fine-tune and merge done) sits next to each attempt and
must come out byte-identical; the failed stage leaves neither a ``_SUCCESS`` nor half-written output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hostile_models import SENTINEL, build_pickle_model, build_remote_code_model
from k8s.fakeapi import FakeCluster
from kubetune.artifacts import SUCCESS_MARKER
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.errors import EXIT_CODES
from kubetune.stages import run_stage
from tiny import build_tiny_mpt, tiny_recipe_dict

DOC = (Path(__file__).resolve().parents[1] / "docs" / "exit-codes.md").read_text()


# ---- fixtures and the common contract ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """An artifacts root holding run "keep" with finetune and merge finished (made once, copied per test)."""
    root = tmp_path_factory.mktemp("finished") / "artifacts"
    recipe = recipe_from_dict(keep_dict(tiny_model_dir, root))
    for stage in ("finetune", "merge"):
        run_stage(recipe, stage)
    return root


def keep_dict(model_dir: Path, root: Path, **sections) -> dict:
    data = tiny_recipe_dict(model_dir, root, finetune={"max_steps": 2, "save_steps": 1}, **sections)
    data["run"]["name"] = "keep"
    return data


@pytest.fixture
def artifacts(finished, tmp_path) -> Path:
    root = tmp_path / "artifacts"
    shutil.copytree(finished, root)
    return root


@pytest.fixture
def write(tiny_model_dir, artifacts, tmp_path):
    """write(name="bad", **sections) -> a recipe file for the tiny model writing under ``artifacts``."""

    def make(name: str = "bad", **sections) -> Path:
        data = tiny_recipe_dict(tiny_model_dir, artifacts, finetune={"max_steps": 2, "save_steps": 1})
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        data["run"]["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def kubetune(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def snapshot(root: Path) -> dict[str, str]:
    """Every finished file of run "keep" (stage folders and fine-tune checkpoints), by content."""
    run = root / "keep"
    files = [p for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] not in (".locks", ".tmp")]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def handled(result, code: int, words: str, root: Path | None = None, before: dict | None = None,
            run: str = "bad", stage: str | None = None) -> None:
    """The contract of every case (see the module docstring)."""
    output = result.output
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{output}\n{result.exception!r}"
    assert code in EXIT_CODES and f"| {code} |" in DOC
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert words in output, output
    assert "Traceback" not in output
    if root is not None:
        assert snapshot(root) == before, "a finished artifact of another run changed"
        if stage:
            assert not (root / run / stage / SUCCESS_MARKER).exists()
        assert not [p for p in (root / run / ".tmp").glob("*") if any(p.iterdir())], "half-written output left"


# ---- the recipe: exit 3 before anything runs ------------------------------------------------------------------------
RECIPES = {
    "malformed-yaml": ("model: {name_or_path: x\nfinetune: [1, 2\n", "not valid YAML"),
    "tab-indented-yaml": ("model:\n\tname_or_path: x\n", "line 2, column 1: not valid YAML"),
    "not-a-mapping": ("- model\n- finetune\n", "expected a mapping of sections, got list"),
    "empty-file": ("", "model: Field required"),
    "wrong-type-int": ({"finetune": {"batch_size": "eight"}}, "finetune.batch_size: Input should be a valid integer"),
    "wrong-type-list": ({"stages": "finetune"}, "stages: Input should be a valid list"),
    "unknown-top-level-key": ({"finetunes": {"epochs": 1}}, "finetunes: unknown key"),
    "unknown-nested-key": ({"quantize": {"group": 32}}, "quantize.group: unknown key"),
    "bits-3": ({"quantize": {"bits": 3}}, "quantize.bits: Input should be 4 or 8"),
    "negative-learning-rate": ({"finetune": {"learning_rate": -1e-4}},
                               "finetune.learning_rate: Input should be greater than 0"),
    "lora-rank-0": ({"finetune": {"lora": {"r": 0}}}, "finetune.lora.r: Input should be greater than or equal to 1"),
    "dropout-above-1": ({"finetune": {"lora": {"dropout": 1.5}}}, "finetune.lora.dropout: Input should be less than 1"),
    "run-name-not-dns": ({"run": {"name": "My Run"}}, "run.name: String should match pattern"),
    "template-without-question": ({"prompt": {"template": "{context} only"}}, "prompt.template: must contain {question}"),
    "unknown-gate": ({"evaluate": {"gates": {"accuracy_min": 50}}}, "evaluate.gates: unknown gate(s) accuracy_min"),
    "stages-out-of-order": ({"stages": ["merge", "finetune"]}, "stages: list them once each, in pipeline order"),
    "group-size-0": ({"quantize": {"group_size": 0}}, "quantize.group_size: must be -1 (per row)"),
    "several-problems-at-once": ({"quantize": {"bits": 3}, "finetune": {"epochs": -1, "lora": {"r": 0}}},
                                 "3 problems"),
    # YAML that PyYAML accepts silently: the second key replaces the first; aliases expand without bound
    "duplicate-key": ("model: {name_or_path: x}\nfinetune: {epochs: 2}\nfinetune: {max_steps: 3}\n",
                      "line 3, column 1: not valid YAML (duplicate key 'finetune'"),
    "alias-expansion": ("model: {name_or_path: x}\nkubernetes:\n  tolerations:\n  - a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
                        + "".join(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
                        "aliases expand to more than 100,000 values"),
    # values that validated, then crashed render or a stage with a traceback
    "nan-float": ("model: {name_or_path: x}\nfinetune: {learning_rate: .nan}\n",
                  "finetune.learning_rate: Input should be a finite number"),
    "inf-gate": ({"evaluate": {"gates": {"quantized_max_drop": float("inf")}}},
                 "evaluate.gates.quantized_max_drop: Input should be a finite number"),
    "date-in-toleration": ("model: {name_or_path: x}\nkubernetes: {tolerations: [{key: a, value: 2026-12-06}]}\n",
                           "kubernetes.tolerations.0.value: input was not a valid JSON value"),
    "lone-surrogate": ('model: {name_or_path: x}\nkubernetes: {affinity: {a: "b\\ud800"}}\n',
                       "kubernetes.affinity: contains a lone UTF-16 surrogate"),
    "template-format-spec": ({"prompt": {"template": "{context} {question:d}"}},
                             "prompt.template: placeholder(s) {question:d} carry a format spec or conversion"),
    "template-conversion": ({"prompt": {"template": "{context!r} {question}"}},
                            "prompt.template: placeholder(s) {context!r} carry a format spec or conversion"),
    "artifacts-root-climbs-out": ({"run": {"artifacts_root": "../../outside"}},
                                  "run.artifacts_root: ../../outside climbs out of the working directory"),
    "run-name-starts-with-digit": ({"run": {"name": "1run"}}, "run.name: String should match pattern '^[a-z]"),
    # torchao has NF4 only; and a quantizer for a base that is not quantized is a slip, not a choice
    "torchao-fp4": ({"finetune": {"base_precision": "4bit", "base_quantizer": "torchao", "bnb": {"quant_type": "fp4"}}},
                    "finetune.bnb.quant_type: fp4 is a bitsandbytes data type; torchao"),
    "torchao-without-kbit-base": ({"finetune": {"base_quantizer": "torchao"}},
                                  "finetune.base_quantizer: torchao quantizes a 4bit or 8bit base"),
    # read by transformers only when the merge saves, after the fine-tune and the merge itself
    "merge-shard-size-unreadable": ({"merge": {"max_shard_size": "2 gigabytes"}},
                                    "merge.max_shard_size: String should match pattern"),
}


@pytest.mark.parametrize("case", RECIPES)
def test_recipe(case, write, artifacts, tmp_path, tiny_model_dir):
    content, words = RECIPES[case]
    before = snapshot(artifacts)
    if isinstance(content, str):
        path = tmp_path / "bad.yaml"
        path.write_text(content)
    else:
        data = tiny_recipe_dict(tiny_model_dir, artifacts)
        data["run"]["name"] = "bad"
        for key, value in content.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
    result = kubetune("stage", "finetune", "--recipe", path)
    handled(result, 3, words, artifacts, before, stage="finetune")
    if case == "several-problems-at-once":  # every problem listed, each with its field path
        for field in ("quantize.bits", "finetune.epochs", "finetune.lora.r"):
            assert field in result.output


def test_recipe_file_missing(tmp_path):
    handled(kubetune("stage", "finetune", "--recipe", tmp_path / "nope.yaml"), 3, "nope.yaml: file not found")


def test_recipe_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {name_or_path: modèle}\n".encode("latin-1"))
    handled(kubetune("stage", "finetune", "--recipe", path), 3, "cannot read")


def test_override_without_equals(write, artifacts):
    before = snapshot(artifacts)
    handled(kubetune("stage", "finetune", "--recipe", write(), "--set", "finetune.lora.r"), 3,
            "expected KEY.PATH=VALUE", artifacts, before, stage="finetune")


def test_override_out_of_range(write, artifacts):
    before = snapshot(artifacts)
    handled(kubetune("run", write(), "--set", "finetune.max_steps=-5"), 3,
            "finetune.max_steps: Input should be greater than or equal to 1", artifacts, before, stage="finetune")


# ---- the data: exit 4, after the model loaded, before any step ------------------------------------------------------
def _rows(n: int = 40, answer: str = "SELECT a FROM t") -> list[dict]:
    return [{"context": "CREATE TABLE t (a INTEGER)", "question": f"what is a {i}", "answer": answer} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _file(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


_LATIN1_ROW = json.dumps({"context": "CREATE TABLE t (a INTEGER)", "question": "qué es a", "answer": "SELECT a FROM t"},
                         ensure_ascii=False) + "\n"
_LATIN1_CSV = "context,question,answer\n" + "CREATE TABLE t (a INTEGER),qué es a,SELECT a FROM t\n" * 20

DATA = {  # case: (make the source in a folder, more data settings, words of the message)
    "missing-file": (lambda d: d / "missing.jsonl", {}, "data file not found"),
    "missing-column": (lambda d: _jsonl(d / "x.jsonl", _rows()), {"columns": {"answer": "sql"}},
                       "missing column(s) answer → 'sql'"),
    "empty-file": (lambda d: _file(d / "empty.jsonl", ""), {}, "the file is empty"),
    "no-usable-rows": (lambda d: _jsonl(d / "blank.jsonl", _rows(answer=" ")), {},
                       "no rows with a question and an answer"),
    "not-utf8-jsonl": (lambda d: _file(d / "l1.jsonl", (_LATIN1_ROW * 20).encode("latin-1")), {}, "not valid UTF-8"),
    "not-utf8-csv": (lambda d: _file(d / "l1.csv", _LATIN1_CSV.encode("latin-1")), {}, "not valid UTF-8"),
    "malformed-json-lines": (lambda d: _file(d / "bad.jsonl", '{"context": "x", "question": \n'), {},
                             "cannot load data set"),
    "unsupported-type": (lambda d: _file(d / "rows.txt", "a b c\n"), {}, "unsupported file type '.txt'"),
    "eval-takes-everything": (lambda d: _jsonl(d / "few.jsonl", _rows(12)), {"eval_size": 12},
                              "leaves no training rows out of 12"),
    "unknown-builtin": (lambda d: "builtin:wikisql", {}, "unknown builtin data set 'wikisql'"),
    # 24 MB in one row: tokenizing it took GBs and minutes; refused before any tokenizer sees it
    "oversized-row": (lambda d: _jsonl(d / "big.jsonl", _rows(17) + [{**_rows(1)[0], "context": "x" * 24_000_000}]
                                       + _rows(23)), {}, "big.jsonl: row 18: context (column 'context') has "
                                                         "24,000,000 characters; the limit is 1,000,000"),
}


@pytest.mark.parametrize("case", DATA)
def test_data(case, write, artifacts, tmp_path):
    make, extra, words = DATA[case]
    source = make(tmp_path)
    before = snapshot(artifacts)
    recipe = write(data={"source": str(source), "eval_size": 4, "max_eval_examples": 4, **extra})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 4, words, artifacts, before, stage="finetune")
    assert not list((artifacts / "bad" / ".work" / "finetune" / "checkpoints").glob("checkpoint-*"))


def test_every_prompt_longer_than_max_length(write, artifacts, tmp_path):
    """Nothing left to learn once the prompts alone fill max_length: a data error, not a NaN loss or a crash."""
    source = _jsonl(tmp_path / "long.jsonl", [{**r, "context": "CREATE TABLE t (a INTEGER) " * 20} for r in _rows()])
    before = snapshot(artifacts)
    recipe = write(data={"source": str(source), "eval_size": 4}, finetune={"max_length": 32, "max_steps": 2})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 4, "raise finetune.max_length", artifacts, before,
            stage="finetune")


def test_rows_longer_than_max_length_are_truncated_with_a_warning(write, artifacts, tmp_path, caplog):
    """Decided: a few long rows do not fail the run; they are cut at max_length and the log says how many."""
    long_answer = "SELECT a FROM t WHERE " + " AND ".join(f"a > {i}" for i in range(80))
    source = _jsonl(tmp_path / "mixed.jsonl", _rows(36) + _rows(4, answer=long_answer))
    recipe = write(data={"source": str(source), "eval_size": 4}, finetune={"max_length": 96, "max_steps": 2})
    with caplog.at_level(logging.WARNING, logger="kubetune"):
        result = kubetune("stage", "finetune", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "finetune.max_length=96" in r.getMessage()]
    assert len(warnings) == 1, warnings
    # short rows are 80 tokens, long ones 503: each long row that the seeded split put in training is cut, none dropped
    cut = re.search(r": (\d+) of 36 training rows reach it and are truncated there .*; 0 whose prompt", warnings[0])
    assert cut and 1 <= int(cut.group(1)) <= 4, warnings
    assert (artifacts / "bad" / "finetune" / SUCCESS_MARKER).exists()


# ---- the model: exit 5 ----------------------------------------------------------------------------------------------
def _model_folder(kind: str, tiny: Path, tmp: Path) -> Path:
    if kind == "missing-folder":
        return tmp / "no-such-model"
    if kind == "hub-id-not-cached":
        return Path("kubetune-tests/no-such-model")  # HF_HUB_OFFLINE=1: not in the cache, not downloadable
    if kind == "remote-code-disabled":
        return build_remote_code_model(tiny, tmp / "remote", tmp / SENTINEL)
    if kind == "pickle-only":
        return build_pickle_model(tiny, tmp / "pickle")
    folder = tmp / kind
    shutil.copytree(tiny, folder)
    if kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "config-not-json":
        (folder / "config.json").write_text("{ this is not json")
    elif kind == "no-weights":
        for f in folder.glob("*.safetensors"):
            f.unlink()
    return folder


MODELS = {
    "missing-folder": "model.name_or_path: folder",
    "hub-id-not-cached": "cannot load",
    "no-config": "has no config.json",
    "config-not-json": "cannot load the tokenizer",
    "no-weights": "has no safetensors weights",
    "remote-code-disabled": "model.trust_remote_code",
    "pickle-only": "model.allow_pickle: true",
}


@pytest.mark.parametrize("case", MODELS)
def test_model(case, write, artifacts, tmp_path, tiny_model_dir):
    folder = _model_folder(case, tiny_model_dir, tmp_path)
    before = snapshot(artifacts)
    recipe = write(model={"name_or_path": str(folder), "dtype": "float32"})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 5, MODELS[case], artifacts, before, stage="finetune")
    assert not (tmp_path / SENTINEL).exists(), "the model's own code ran although trust_remote_code is off"


def test_unknown_lora_target_module(write, artifacts):
    before = snapshot(artifacts)
    recipe = write(finetune={"max_steps": 2, "lora": {"r": 4, "alpha": 8, "target_modules": ["qkv_proj"]}})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 5, "['qkv_proj'] not found", artifacts, before,
            stage="finetune")


def test_packing_a_model_whose_attention_ignores_position_ids(write, artifacts, tmp_path):
    """MPT (ALiBi, no document attention in kubetune) would let packed examples attend to each other: refused after
    the load, before the data is read. (BLOOM packs: tests/test_packing.py.)"""
    mpt = build_tiny_mpt(tmp_path / "mpt")
    before = snapshot(artifacts)
    recipe = write(model={"name_or_path": str(mpt), "dtype": "float32"},
                   finetune={"max_steps": 2, "packing": True, "lora": {"r": 4, "alpha": 8, "target_modules": ["Wqkv"]}})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 3,
            "finetune.packing: " + str(mpt) + " (MptForCausalLM, eager attention) would attend across packed "
            "examples: its attention mask ignores position_ids; use finetune.group_by_length instead",
            artifacts, before, stage="finetune")


# ---- stage order and finished artifacts: exit 6; a recipe problem found late: exit 3 -------------------------------
def test_merge_before_finetune(write, artifacts):
    before = snapshot(artifacts)
    handled(kubetune("stage", "merge", "--recipe", write()), 6, "stage 'finetune' (needed by 'merge') has not finished",
            artifacts, before, stage="merge")


def test_finished_artifact_of_another_recipe_is_never_overwritten(write, artifacts):
    before = snapshot(artifacts)
    recipe = write("keep", finetune={"max_steps": 3, "save_steps": 1})
    handled(kubetune("stage", "finetune", "--recipe", recipe), 6, "never overwritten", artifacts, before)


def test_gptq_group_size_not_dividing_hidden_size(write, artifacts):
    """Found in seconds, before the model is loaded for GPTQ: 48 does not divide the tiny model's 64."""
    before = snapshot(artifacts)
    recipe = write("keep", quantize={"group_size": 48})
    handled(kubetune("stage", "quantize", "--recipe", recipe), 3,
            "quantize.group_size: 48 does not divide the input size", artifacts, before, run="keep", stage="quantize")


# ---- the volume: exit 13 (StorageError) ----------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at ``path`` (root only; CI runs as root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        message = f"cannot mount a tmpfs here ({mount.stderr.strip()}); the disk-full cases need root"
        if os.environ.get("KUBETUNE_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _on_small_volume(finished: Path, root: Path, size_kib: int):
    """tmpfs holding run "keep" with only its fine-tune finished, and ``size_kib`` KiB in all."""
    ctx = tmpfs(root, f"{size_kib}k")
    ctx.__enter__()
    shutil.copytree(finished / "keep" / "finetune", root / "keep" / "finetune")
    return ctx


def test_disk_full_then_free_space_and_rerun(finished, write, tmp_path, tiny_model_dir):
    root = tmp_path / "volume"
    used = sum(p.stat().st_size for p in (finished / "keep" / "finetune").rglob("*") if p.is_file())
    merged = sum(p.stat().st_size for p in (finished / "keep" / "merge").rglob("*") if p.is_file())
    # room for what is there and half of the merged model: the merge runs out of space while saving
    ctx = _on_small_volume(finished, root, (used + merged // 2) // 1024 + 64)
    try:
        recipe = tmp_path / "keep.yaml"
        recipe.write_text(yaml.safe_dump(keep_dict(tiny_model_dir, root)))
        before = snapshot(root)
        result = kubetune("stage", "merge", "--recipe", recipe)
        handled(result, 13, "no space left on the volume", root, before, run="keep", stage="merge")
        assert not (root / "keep" / "merge").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)  # the user frees space
        assert kubetune("stage", "merge", "--recipe", recipe).exit_code == 0
        assert (root / "keep" / "merge" / SUCCESS_MARKER).exists() and snapshot(root).items() >= before.items()
    finally:
        ctx.__exit__(None, None, None)


def test_read_only_volume_then_writable_and_rerun(finished, tmp_path, tiny_model_dir):
    root = tmp_path / "volume"
    ctx = _on_small_volume(finished, root, 4096)
    try:
        recipe = tmp_path / "keep.yaml"
        recipe.write_text(yaml.safe_dump(keep_dict(tiny_model_dir, root)))
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        before = snapshot(root)
        result = kubetune("stage", "merge", "--recipe", recipe)
        handled(result, 13, "read-only file system", root, before, run="keep", stage="merge")
        subprocess.run(["mount", "-o", "remount,rw", str(root)], check=True)
        assert kubetune("stage", "merge", "--recipe", recipe).exit_code == 0
        assert snapshot(root).items() >= before.items()
    finally:
        ctx.__exit__(None, None, None)


def test_storage_errors_from_libraries_that_do_not_raise_oserror(tmp_path):
    """safetensors words ENOSPC in its own exception; torch.save to a path gives no reason at all (its C++ stream
    keeps no errno), so the volume it wrote to decides. Both map to exit 13; torch's words alone do not."""
    import safetensors.torch
    import torch

    from kubetune.errors import StorageError, storage_error

    with tmpfs(tmp_path / "full", "64k") as full:
        with pytest.raises(Exception) as rust:  # safetensors' Rust writer: its own exception type
            safetensors.torch.save_file({"x": torch.zeros(100_000)}, str(full / "model.safetensors"))
        assert isinstance(storage_error(rust.value), StorageError), repr(rust.value)
        (full / "model.safetensors").unlink(missing_ok=True)
        with pytest.raises(RuntimeError) as real:
            torch.save({"x": torch.zeros(100_000)}, full / "optimizer.pt")
        assert storage_error(real.value) is None, "no reason given: not a storage error without a volume to look at"
        assert f"{full}: no space left on the volume" in str(storage_error(real.value, volume=full))
        assert storage_error(real.value, volume=tmp_path) is None, "a volume with room: some other failure"
    assert storage_error(ValueError("No such column")) is None
    assert StorageError.exit_code == 13 and StorageError.permanent


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


def test_disk_full_during_a_checkpoint_torch_save_then_free_space_and_rerun(finished, tmp_path, tiny_model_dir):
    """The volume fills while the Trainer's torch.save writes a checkpoint's optimizer.pt: exit 13 with one line
    (it was exit 1 with two tracebacks, which podFailurePolicy retries), then a rerun with room finishes."""
    done = finished / "keep" / ".work" / "finetune" / "checkpoints" / "checkpoint-1"
    before_optimizer = [p for p in done.iterdir() if p.name not in ("optimizer.pt", "scheduler.pt", "rng_state.pth",
                                                                     "trainer_state.json", "kubetune-checkpoint.json")]
    # the first checkpoint's files up to optimizer.pt, the checkpoints' README and fingerprint, half the optimizer
    size = sum(map(_pages, before_optimizer)) + 2 * 4096 + _pages(done / "optimizer.pt") // 2
    with tmpfs(tmp_path / "volume", f"{size // 1024}k") as root:
        data = keep_dict(tiny_model_dir, root)
        data["run"]["name"] = "full"
        recipe = tmp_path / "full.yaml"
        recipe.write_text(yaml.safe_dump(data))
        result = kubetune("stage", "finetune", "--recipe", recipe)
        handled(result, 13, f"{root / 'full'}: no space left on the volume", root, {}, run="full", stage="finetune")
        checkpoint = root / "full" / ".work" / "finetune" / "checkpoints" / "checkpoint-1"
        assert (checkpoint / "optimizer.pt").exists() and not (checkpoint / "scheduler.pt").exists(), \
            "the volume did not fill during optimizer.pt's torch.save"
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)  # the user frees space
        again = kubetune("stage", "finetune", "--recipe", recipe)
        assert again.exit_code == 0, again.output
        assert (root / "full" / "finetune" / SUCCESS_MARKER).exists()


# ---- the cluster: exit 10, or a reason that `status` shows ----------------------------------------------------------
K8S_RECIPE = {"run": {"name": "gpu1"}, "model": {"name_or_path": "org/model"}, "stages": ["finetune", "merge"],
              "infer": {"models": ["base"]}, "kubernetes": {"image": "registry.example.com/ml/kubetune:0.1.0"}}


@pytest.fixture
def fake(tmp_path):
    with FakeCluster("ml") as fc:
        fc.kubeconfig_path = str(fc.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))
        yield fc


@pytest.fixture
def k8s_recipe(tmp_path) -> Path:
    path = tmp_path / "gpu1.yaml"
    path.write_text(yaml.safe_dump(K8S_RECIPE))
    return path


def _no_cluster_env(tmp_path: Path) -> dict:
    return {"KUBECONFIG": str(tmp_path / "absent"), "KUBERNETES_SERVICE_HOST": "", "KUBETUNE_KUBECONFIG": None}


def test_kubeconfig_missing(tmp_path):
    handled(kubetune("status", env=_no_cluster_env(tmp_path)), 10, "no Kubernetes configuration")


def test_kubeconfig_not_yaml(tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text(":: {not: [valid\n")
    handled(kubetune("status", "--kubeconfig", bad), 10, "cannot load the Kubernetes configuration")


def test_kubeconfig_unknown_context(fake):
    handled(kubetune("status", "--kubeconfig", fake.kubeconfig_path, "--context", "nope"), 10,
            "cannot load the Kubernetes configuration")


def test_api_server_unreachable(tmp_path):
    with FakeCluster() as fc:
        path = fc.kubeconfig(tmp_path / "kc")
    # the server has stopped: nothing listens there now (the client's retries make this take a few seconds)
    handled(kubetune("list", "--kubeconfig", path), 10, "cannot reach the Kubernetes API")


def test_namespace_forbidden_for_reading(fake):
    fake.kube.deny.add(("get", "jobs"))
    handled(kubetune("status", "gpu1", "--kubeconfig", fake.kubeconfig_path), 10,
            'forbidden: cannot list jobs (batch) in namespace "ml"')


def test_namespace_forbidden_for_creating_keeps_what_exists(fake, k8s_recipe):
    assert kubetune("submit", k8s_recipe, "--stage", "finetune", "--kubeconfig", fake.kubeconfig_path).exit_code == 0
    before = {kind: sorted(fake.objects(kind)) for kind in ("Job", "ConfigMap", "PersistentVolumeClaim")}
    fake.kube.deny.add(("create", "jobs"))
    handled(kubetune("submit", k8s_recipe, "--stage", "merge", "--kubeconfig", fake.kubeconfig_path), 10,
            'forbidden: cannot create jobs (batch)/gpu1-merge in namespace "ml"')
    assert {kind: sorted(fake.objects(kind)) for kind in before} == before


def test_unschedulable_gpu_request_is_shown_by_status_and_logs(fake, k8s_recipe):
    kc = ["--kubeconfig", fake.kubeconfig_path]
    assert kubetune("submit", k8s_recipe, "--stage", "finetune", *kc).exit_code == 0
    job = fake.objects("Job")["gpu1-finetune"]
    reason = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    fake.add_pod(job, "gpu1-finetune-p1", phase="Pending", scheduled_message=reason)
    fake.start_job("gpu1-finetune")
    status = kubetune("status", "gpu1", *kc)
    assert status.exit_code == 0 and f"finetune: Unschedulable: {reason}" in status.output, status.output
    handled(kubetune("logs", "gpu1", "--stage", "finetune", *kc), 10, f"waiting for pod gpu1-finetune-p1 "
            f"(Unschedulable: {reason})")


def test_image_pull_failure_is_shown_by_status(fake, k8s_recipe):
    kc = ["--kubeconfig", fake.kubeconfig_path]
    assert kubetune("submit", k8s_recipe, "--stage", "finetune", *kc).exit_code == 0
    fake.add_pod(fake.objects("Job")["gpu1-finetune"], "gpu1-finetune-p1", phase="Pending",
                 waiting_reason="ImagePullBackOff")
    fake.start_job("gpu1-finetune")
    status = kubetune("status", "gpu1", *kc)
    assert status.exit_code == 0, status.output
    row = next(line for line in status.output.splitlines() if line.startswith("finetune "))
    assert row.split()[1] == "Pending"
    assert "finetune: ImagePullBackOff: back-off pulling" in status.output
