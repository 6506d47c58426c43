"""``kubetune import-gguf`` on a real (tiny) GGUF file: the same weights and tokens come out, a second import is a
no-op, a killed import leaves nothing behind, and every user mistake is one line with exit code 5."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune import gguf_import
from kubetune.cli import cli
from kubetune.errors import ModelError
from kubetune.gguf_import import IMPORT_MARKER, fetch_gemma3_270m, import_gguf, read_marker


def _permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf stores q/k rows interleaved for its RoPE; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, path: Path) -> Path:
    """The tiny Llama in ``model_dir`` as an F32 GGUF with its byte-level BPE tokenizer, written as llama.cpp does."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t, _ in vocab])  # 3 = control, 1 = normal
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in hf_to_gguf.items()})
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if "q_proj" in name:
            array = _permute(array, cfg.num_attention_heads)
        elif "k_proj" in name:
            array = _permute(array, cfg.num_key_value_heads)
        w.add_tensor(names[name], np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_import_gives_the_same_model_and_tokenizer(tiny_gguf, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    assert not result.skipped and result.path == (tmp_path / "model").absolute()
    files = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", IMPORT_MARKER} <= files
    marker = read_marker(result.path)
    assert marker["dtype"] == "float32" and marker["gguf_file"] == tiny_gguf.name
    assert "quantization_config" not in json.loads((result.path / "config.json").read_text())

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    imported = AutoModelForCausalLM.from_pretrained(result.path)
    tok, imported_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(result.path)
    text = "SELECT name FROM table_1 WHERE age > 30 AND city = 'boston'"
    assert imported_tok(text).input_ids == tok(text).input_ids
    assert imported_tok.eos_token == tok.eos_token
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_second_import_returns_at_once_without_rewriting(tiny_gguf, tmp_path, monkeypatch):
    first = import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete import must not be loaded again")

    monkeypatch.setattr(gguf_import, "_load", no_loading)
    again = import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    assert again.skipped and again.path == first.path
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_import_leaves_no_folder_and_the_next_one_completes(tiny_gguf, tmp_path, monkeypatch):
    real_load = gguf_import._load

    def load_then_die(*args, **kwargs):
        tokenizer, model = real_load(*args, **kwargs)

        def killed(*a, **k):
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the tokenizer was being written

        tokenizer.save_pretrained = killed
        return tokenizer, model

    monkeypatch.setattr(gguf_import, "_load", load_then_die)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]  # no model/, no temporary folder

    # A SIGKILL cannot clean up: its temporary folder stays, and the next import removes it.
    stale = tmp_path / ".model.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(gguf_import, "_load", real_load)
    result = import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    assert not result.skipped and read_marker(result.path) is not None
    assert not stale.exists()


def test_missing_file_is_one_line_exit_5(tmp_path):
    result = invoke("import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    assert result.exit_code == ModelError.exit_code == 5
    assert result.output.strip() == f"error: {tmp_path / 'nope.gguf'}: GGUF file not found"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a model"), "not a GGUF file"),
    (lambda p: p.mkdir(), "not a file"),
])
def test_not_a_gguf_file_is_one_line_exit_5(tmp_path, make, message):
    make(tmp_path / "model.gguf")
    result = invoke("import-gguf", str(tmp_path / "model.gguf"), str(tmp_path / "out"))
    assert result.exit_code == 5 and message in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output


def test_unsupported_architecture_is_a_model_error(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "no-such-arch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="transformers cannot load it"):
        import_gguf(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["odd.gguf"]


def test_truncated_file_is_a_model_error(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:2000])  # the header and part of the vocabulary
    result = invoke("import-gguf", str(cut), str(tmp_path / "out"))
    assert result.exit_code == 5 and "transformers cannot load it" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_existing_folders_are_never_overwritten(tiny_gguf, tmp_path):
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a kubetune GGUF import"):
        import_gguf(tiny_gguf, user_folder)
    assert (user_folder / "notes.txt").read_text() == "keep me"

    import_gguf(tiny_gguf, tmp_path / "model", dtype="float32")
    result = invoke("import-gguf", "--dtype", "bfloat16", str(tiny_gguf), str(tmp_path / "model"))
    assert result.exit_code == 5 and "holds an import of" in result.output


def test_cli_converts_and_then_reports_nothing_to_do(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    first = invoke("import-gguf", "--dtype", "float32", str(tiny_gguf), str(out))
    assert first.exit_code == 0, first.output
    assert "imported" in first.output and (out / "config.json").exists()
    second = invoke("import-gguf", "--dtype", "float32", str(tiny_gguf), str(out))
    assert second.exit_code == 0 and "nothing to do" in second.output


def test_cli_usage_errors_exit_2(tmp_path):
    assert invoke("import-gguf", str(tmp_path / "only-one")).exit_code == 2
    assert invoke("import-gguf", "--gemma3-270m", "a", "b").exit_code == 2


def _fake_package(monkeypatch, payload: bytes):
    import hashlib

    calls = []

    def assemble(output_path=None, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(payload)
        return Path(output_path)

    module = types.SimpleNamespace(MODEL_NAME="fake.gguf", EXPECTED_SHA256=hashlib.sha256(payload).hexdigest(),
                                   assemble=assemble)
    monkeypatch.setitem(sys.modules, gguf_import.GEMMA3_270M_PACKAGE, module)
    return calls


def test_fetch_gemma3_assembles_once_under_a_temporary_name(tmp_path, monkeypatch):
    calls = _fake_package(monkeypatch, b"GGUF fake weights")
    path = fetch_gemma3_270m(tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == b"GGUF fake weights"
    assert calls and calls[0].name.startswith(".fake.gguf.tmp-")  # never written in place
    assert fetch_gemma3_270m(tmp_path / "cache") == path and len(calls) == 1

    path.write_bytes(b"GGUF damaged")
    with pytest.raises(ModelError, match="unexpected sha256"):
        fetch_gemma3_270m(tmp_path / "cache")


def test_fetch_gemma3_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, gguf_import.GEMMA3_270M_PACKAGE, None)  # import raises ImportError
    result = invoke("import-gguf", "--gemma3-270m", "--cache-dir", str(tmp_path / "c"), str(tmp_path / "out"))
    assert result.exit_code == 5 and "kubetune[demo]" in result.output
    assert not os.path.exists(tmp_path / "out")
