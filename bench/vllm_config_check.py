"""vLLM's own config checks, on the CPU, against kubetune's exports (issue 20, item 4's fallback).

    # once: vLLM without its CUDA dependencies, beside (not in) the project's venv
    bash bench/vllm_config_site.sh 0.30.0      # -> .cache/vllm-0.30.0/{site,deps}; or: make test-vllm-config
    PYTHONPATH=src .venv/bin/python bench/vllm_config_check.py --vllm .cache/vllm-0.30.0 \\
        [--model-dir /path/to/imported/gemma-3-270m] --out bench/results/vllm-config-0.30.0-cpu.json

What it does: a tiny Llama (tests/tiny.py's ``build_tiny_model``) and a tiny Gemma 3 text model
(``build_tiny_gemma3``: Gemma3ForCausalLM, a sliding and a full-attention layer, tied embeddings, as the Gemma
recipe's model) run the tiny recipe's finetune, merge and quantize stages through :func:`kubetune.stages.run_stage`
at GPTQ 4 and 8 bits. Each export (``merge/``, ``quantize/`` of each run; ``--model-dir`` adds a folder such as
``kubetune import-gguf``'s real Gemma 3 270M, which is what the Gemma recipe merges into) is then handed, in a
child process with vLLM on its path, to vLLM's own machinery:

* ``vllm.config.ModelConfig(model=DIR)``: the HF config parse, the architecture resolved against vLLM's model
  registry (its subprocess inspection of the model class), the dtype, ``max_model_len``, and the quantization
  method picked from ``config.json``'s ``quantization_config`` (the overrides in vLLM's order of preference);
* the picked quantization config class's ``from_config`` on that ``quantization_config`` (bits, group size,
  desc_act, sym, the kernel's scalar type), and ``maybe_update_config``, which reads the safetensors header to find
  the quantized modules;
* for every quantized module: the tensors vLLM's GPTQ linear method allocates (``create_weights`` on an empty
  module, the kernel choice made for an sm90 card, since vLLM cannot pick one without a GPU) against the
  export's tensors of the same names: names, shapes and dtypes;
* the tokenizer through ``vllm.tokenizers.get_tokenizer``, the generation config (``get_diff_sampling_param``),
  and kubetune's chat template (``kubetune.serving.chat_template``) rendered by vLLM's ``safe_apply_chat_template``
  against the saved prompt template's own formatting.

Each check is recorded as accepted, or refused with vLLM's message. Nothing here runs a forward pass: vLLM's
kernels need a GPU (bench/serve_vllm.py does that part). The JSON result carries bench/harness.py's environment
plus the vLLM version and the packages put beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench"), str(ROOT / "tests")]

# vLLM's GPTQ kernels are chosen by the card's compute capability; without a card, the check asks as an H100 would
SM90 = 90
QUESTION = {"context": "CREATE TABLE head (age INTEGER)", "question": "How many heads are older than 56 ?"}


def build_exports(work: Path) -> dict[str, Path]:
    """The tiny recipe's merge and GPTQ-4/8 exports of a tiny Llama and a tiny Gemma 3: {label: folder}."""
    from tiny import build_tiny_gemma3, build_tiny_model, tiny_recipe_dict

    from kubetune.config import Recipe
    from kubetune.stages import run_stage

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")       # ENVIRONMENT.md: GPTQModel on 2 cores
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # skips a 50 s g++ build, same output
    exports: dict[str, Path] = {}
    for arch, build in (("llama", build_tiny_model), ("gemma3", build_tiny_gemma3)):
        model = work / "models" / arch
        if not (model / "config.json").exists():
            build(model)
        for bits in (4, 8):
            name = f"{arch}-gptq{bits}"
            recipe = Recipe.model_validate(tiny_recipe_dict(
                model, work / "artifacts", run={"name": name, "artifacts_root": str(work / "artifacts")},
                quantize={"bits": bits}))
            for stage in ("finetune", "merge", "quantize"):
                run_stage(recipe, stage)
            run_dir = work / "artifacts" / name
            if bits == 4:  # the merge does not depend on the bits: one merged model per architecture
                exports[f"{arch}/merged"] = run_dir / "merge"
            exports[f"{arch}/gptq{bits}"] = run_dir / "quantize"
    return exports


# ---------------------------------------------------------------- the child: vLLM on sys.path, one folder per call

def check_quantized_tensors(model_config, quant_config, folder: Path) -> dict:
    """vLLM's GPTQ linear method's parameters for every quantized module, against the export's tensors."""
    import torch
    from safetensors import safe_open

    import vllm.platforms.interface as platform_interface
    from vllm.platforms import PlatformEnum, current_platform

    tensors: dict[str, tuple[list[int], str]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                tensors[key] = (list(piece.get_shape()), piece.get_dtype())
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    # vLLM picks a mixed-precision kernel from the platform's list by capability; the CPU's "unspecified" platform
    # lists none, so the check asks as a CUDA sm90 card (H100) would. Only the choice is made, no kernel runs.
    current_platform._enum = PlatformEnum.CUDA
    single_process_group()
    current_platform.get_device_capability = lambda device_id=0: platform_interface.DeviceCapability(9, 0)
    mismatches, kernels, discarded = [], set(), set()
    # what the loader drops on the way in (vLLM >= 0.30: GPTQ's g_idx without desc_act); older releases have none
    mapper = getattr(quant_config, "get_checkpoint_weight_mapper", None)
    dropped = (lambda key: mapper()._map_name(key) is None) if mapper else (lambda key: False)
    dtype = model_config.dtype
    for module in modules:
        rows, cols = tensors[f"{module}.qweight"][0]
        in_features, out_features = rows * quant_config.pack_factor, cols
        layer = torch.nn.Module()
        method = quant_config.get_quant_method(probe_linear(), prefix=module)
        if method is None or type(method).__name__ == "UnquantizedLinearMethod":
            mismatches.append(f"{module}: vLLM would not quantize it")
            continue
        method.create_weights(layer, in_features, [out_features], in_features, out_features, dtype,
                              weight_loader=lambda *a, **k: None)
        kernels.add(type(getattr(method, "kernel", method)).__name__)
        for name, param in layer.named_parameters():
            key = f"{module}.{name}"
            if key not in tensors:
                mismatches.append(f"{key}: vLLM allocates it, the export lacks it")
                continue
            shape, stored = tensors[key]
            if shape != list(param.shape):
                mismatches.append(f"{key}: export {shape}, vLLM {list(param.shape)}")
            if param.dtype == torch.int32 and stored != "I32":
                mismatches.append(f"{key}: export {stored}, vLLM int32")
        allocated = {f"{module}.{n}" for n, _ in layer.named_parameters()}
        for key in sorted(k for k in tensors if k.startswith(module + ".") and k not in allocated):
            if dropped(key):
                discarded.add(key.rsplit(".", 1)[1])
            else:
                mismatches.append(f"{key}: in the export, vLLM has no parameter for it")
    return {"modules": len(modules), "kernels": sorted(kernels), "mismatches": mismatches,
            "discarded_by_vllm_loader": sorted(discarded)}


def single_process_group() -> None:
    """vLLM's tensor-parallel group of one process (gloo, on the CPU): its weight parameters ask for their rank."""
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                distributed_init_method=f"file://{tempfile.mktemp()}")
    parallel_state.initialize_model_parallel(1, 1, backend="gloo")


def probe_linear():
    """An empty module of vLLM's LinearBase class: what its get_quant_method tells quantized layers apart by."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    layer = LinearBase.__new__(LinearBase)
    torch.nn.Module.__init__(layer)
    return layer


def step(result: dict, name: str, fn):
    """Run one of vLLM's checks; record what it returned, or that it refused and why."""
    try:
        value = fn()
        result[name] = {"accepted": True, **(value or {})}
        return value
    except Exception as exc:  # noqa: BLE001 - a refusal is the finding
        result[name] = {"accepted": False, "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                        "where": traceback.format_exc().strip().splitlines()[-3:]}
        return None


def check_folder(folder: Path) -> dict:
    from vllm.config import ModelConfig

    result: dict = {"folder": str(folder)}
    state: dict = {}

    def model_config():
        mc = state["mc"] = ModelConfig(model=str(folder), tokenizer=str(folder), dtype="auto")
        return {"architecture": mc.architecture, "model_type": mc.hf_config.model_type,
                "quantization": mc.quantization, "dtype": str(mc.dtype), "max_model_len": mc.max_model_len}

    if step(result, "model_config", model_config) is None:
        return result
    mc = state["mc"]
    hf_quant = getattr(mc.hf_config, "quantization_config", None)
    if hf_quant is not None:
        def quantization():
            from vllm.model_executor.layers.quantization import get_quantization_config

            qc = state["qc"] = get_quantization_config(mc.quantization).from_config(dict(hf_quant))
            qc.maybe_update_config(str(folder), hf_config=mc.hf_config)
            return {"class": type(qc).__name__, "bits": qc.weight_bits, "group_size": qc.group_size,
                    "desc_act": qc.desc_act, "quant_type": str(qc.quant_type),
                    "quantized_modules": len(qc.modules_in_block_to_quantize or [])}

        if step(result, "quantization_config", quantization) is not None:
            def tensors():
                from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

                with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
                    found = check_quantized_tensors(mc, state["qc"], folder)
                if found["mismatches"]:
                    raise ValueError("; ".join(found["mismatches"][:10]))
                return found

            step(result, "quantized_tensors_sm90", tensors)

    def tokenizer():
        from vllm.tokenizers import get_tokenizer

        tok = state["tok"] = get_tokenizer(str(folder))
        ids = tok.encode("SELECT COUNT(*) FROM head WHERE age > 56")
        return {"class": type(tok).__name__, "eos_token_id": tok.eos_token_id,
                "config_eos_token_id": getattr(mc.hf_config, "eos_token_id", None),
                "round_trip": tok.decode(ids, skip_special_tokens=True).strip()
                == "SELECT COUNT(*) FROM head WHERE age > 56"}

    step(result, "tokenizer", tokenizer)
    step(result, "generation_config", lambda: {"sampling_defaults": mc.get_diff_sampling_param()})
    if "tok" in state:
        def chat():
            from vllm.renderers.hf import safe_apply_chat_template

            from kubetune.prompt import PromptTemplate
            from kubetune.serving import chat_template

            saved = PromptTemplate.load(folder)
            if saved is None:
                return {"skipped": "no kubetune_prompt.json"}
            conversation = [{"role": "system", "content": QUESTION["context"]},
                            {"role": "user", "content": QUESTION["question"]}]
            text = safe_apply_chat_template(mc, state["tok"], conversation, chat_template=chat_template(
                saved.template), tokenize=False)
            expected = saved.format(**QUESTION)
            if text != expected:
                raise ValueError(f"vLLM renders {text!r}, the infer stage's prompt is {expected!r}")
            return {"equals_infer_prompt": True}

        step(result, "chat_template", chat)
    return result


def child(folders: list[str]) -> int:
    import torch
    import transformers
    import vllm

    print(json.dumps({"vllm": vllm.__version__, "beside": {"torch": torch.__version__,
                                                           "transformers": transformers.__version__},
                      "results": [check_folder(Path(f)) for f in folders]}))
    return 0


# ---------------------------------------------------------------- the parent

def run_child(vllm_dir: Path, folders: list[Path]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(vllm_dir / "site"), str(vllm_dir / "deps"), str(ROOT / "src"),
                                         env.get("PYTHONPATH", "")])
    env.update(VLLM_LOGGING_LEVEL="WARNING", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")  # nothing leaves the machine
    proc = subprocess.run([sys.executable, __file__, "child", *map(str, folders)], env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"vllm\"")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vLLM child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def beside(vllm_dir: Path) -> dict[str, str]:
    """The distributions put beside vLLM (its --no-deps install and the few its config modules import)."""
    found = {}
    for meta in sorted((vllm_dir / "deps").glob("*.dist-info")) + sorted((vllm_dir / "site").glob("*.dist-info")):
        name, _, version = meta.name[:-len(".dist-info")].rpartition("-")
        found[name] = version
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", required=True,
                   help="folder with site/ (vLLM unpacked) and deps/ (bench/vllm_config_site.sh)")
    p.add_argument("--out", required=True, help="the JSON result")
    p.add_argument("--work", default=None, help="where the tiny models and runs go (default: a temporary folder)")
    p.add_argument("--model-dir", action="append", default=[], help="another model folder to check (repeatable)")
    args = p.parse_args(argv)
    from harness import environment

    vllm_dir = Path(args.vllm).resolve()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vllm-config-"))
    try:
        exports = build_exports(work)
        for extra in args.model_dir:
            exports[f"model-dir/{Path(extra).name}"] = Path(extra).resolve()
        found = run_child(vllm_dir, list(exports.values()))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    by_folder = {r["folder"]: r for r in found["results"]}
    checks = {label: by_folder[str(folder)] for label, folder in exports.items()}
    summary = {label: {name: ("REFUSED" if not c.get("accepted") else "skipped" if "skipped" in c else "accepted")
                       for name, c in r.items() if isinstance(c, dict)} for label, r in checks.items()}
    doc = {"environment": {**environment(cuda=False), "card": "cpu"}, "vllm": found["vllm"],
           "vllm_process_versions": found["beside"],
           "beside_vllm": beside(vllm_dir), "summary": summary, "checks": checks}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for label, row in summary.items():
        print(f"{label:22} " + "  ".join(f"{k}={v}" for k, v in row.items()))
    refused = [label for label, row in summary.items() if "REFUSED" in row.values()]
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
