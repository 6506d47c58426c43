"""`kubetune evaluate MODEL_DIR --data FILE` and kubetune.score.evaluate_model: a model folder that no run made,
scored with the evaluate stage's evaluator and written as infer and evaluate write."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.cli import cli
from kubetune.errors import ArtifactError, DataError
from kubetune.prompt import PromptTemplate
from kubetune.score import evaluate_model
from tiny import build_tokenizer

ROWS = [{"q": f"Which name has id {i}?", "ddl": "CREATE TABLE t (id INTEGER, name TEXT)",
         "sql": f"SELECT name FROM t WHERE id = {i}"} for i in range(4)]


@pytest.fixture(scope="module")
def own_model(tmp_path_factory) -> Path:
    """A causal LM saved with transformers by hand, as a user's folder would be (no kubetune files in it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("own") / "my-model"
    tok = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def test_csv(tmp_path) -> Path:
    path = tmp_path / "ours.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["q", "ddl", "sql"])
        writer.writeheader()
        writer.writerows(ROWS)
    return path


def test_cli_scores_a_folder_no_run_made(own_model, test_csv, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", str(own_model), "--data", str(test_csv), "--out", str(out),
                                      "--column", "question=q", "--column", "context=ddl", "--column", "answer=sql",
                                      "--template", "Q: {question}\nSchema: {context}\nSQL:", "--max-new-tokens",
                                      "6", "--max-examples", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "model       exec acc" in result.output and "\nmerged " in result.output  # the evaluate summary table
    predictions = [json.loads(line) for line in (out / "predictions-merged.jsonl").read_text().splitlines()]
    assert [p["question"] for p in predictions] == [r["q"] for r in ROWS[:3]]
    assert predictions[1]["prompt"] == f"Q: {ROWS[1]['q']}\nSchema: {ROWS[1]['ddl']}\nSQL:"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["merged"]["examples"] == 3 and metrics["scoring"]["databases"] == 3
    outcomes = [json.loads(line) for line in (out / "outcomes-merged.jsonl").read_text().splitlines()]
    assert [o["gold"] for o in outcomes] == [r["sql"] for r in ROWS[:3]] and not any(o["execution_match"] for o in
                                                                                       outcomes if not o["parsed"])
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "merged" and report["template_source"] == "--template"

    again = CliRunner().invoke(cli, ["evaluate", str(own_model), "--data", str(test_csv), "--out", str(out)])
    assert again.exit_code == ArtifactError.exit_code and "never overwritten" in again.output


def test_library_call_uses_the_template_saved_with_the_model(own_model, test_csv, tmp_path):
    folder = tmp_path / "with-template"
    shutil.copytree(own_model, folder)
    PromptTemplate("-- {context}\n-- {question}\n").save(folder)
    metrics = evaluate_model(folder, test_csv, tmp_path / "out", columns={"question": "q", "context": "ddl",
                                                                           "answer": "sql"},
                             max_examples=2, max_new_tokens=4, name="mine")
    assert metrics["models"]["mine"]["examples"] == 2
    first = json.loads((tmp_path / "out" / "predictions-mine.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == f"-- {ROWS[0]['ddl']}\n-- {ROWS[0]['q']}\n"


def test_a_missing_column_is_one_line_naming_the_file(own_model, test_csv, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", str(own_model), "--data", str(test_csv), "--out",
                                      str(tmp_path / "x")])
    assert result.exit_code == DataError.exit_code
    assert "missing column(s)" in result.output and "--column FIELD=NAME" in result.output
    assert not (tmp_path / "x").exists()


def test_an_adapter_folder_is_scored_on_its_base(own_model, test_csv, tmp_path):
    """A LoRA adapter saved by peft (its base named in adapter_config.json) is applied to that base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(own_model), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(own_model)
    metrics = evaluate_model(adapter, test_csv, tmp_path / "out", columns={"question": "q", "context": "ddl",
                                                                            "answer": "sql"},
                             max_examples=2, max_new_tokens=4)
    assert list(metrics["models"]) == ["adapter"] and metrics["models"]["adapter"]["examples"] == 2
    assert json.loads((tmp_path / "out" / "report.json").read_text())["kind"] == "adapter"
