"""The model's shape from its config alone: a build on the ``meta`` device (no memory, no weights, no download),
read for its parameters, its linear layers and its decoder layers.

Where the config comes from: ``--model-config`` (a config.json or a folder holding one), else the recipe's
``model.name_or_path`` (a local folder, or a hub id that the hub cache or the network can answer). The model is
built with transformers' own class for its ``model_type`` even when the recipe trusts remote code: the shapes
are the same, and the estimate must not run code from the internet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import ModelError


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelShape:
    """What the estimator needs to know about a model, read once from its meta build."""

    config: Any
    model_type: str
    architecture: str
    attn_implementation: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    layers_path: str
    """Dotted name of the decoder layers' ModuleList (``model.layers``, ``transformer.h``)."""
    params: dict[str, int]
    """Unique parameters (tied ones once): name → count."""
    linears: list[Linear]
    """Every nn.Linear / Conv1D, including the output head."""
    output_head: str | None
    """Module name of the output embedding (lm_head), never quantized nor given LoRA by 'all-linear'."""
    not_quantized: set[str] = field(default_factory=set)
    """Modules transformers' bitsandbytes integration leaves in 16-bit (head, tied and last modules)."""
    num_heads: int = 1
    """Attention heads (query heads): the length² scores of eager / math attention are per head."""

    def to_dict(self) -> dict:
        """Everything but the config, as JSON (the estimate's disk cache)."""
        return {"model_type": self.model_type, "architecture": self.architecture,
                "attn_implementation": self.attn_implementation, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "num_layers": self.num_layers, "layers_path": self.layers_path,
                "params": self.params, "linears": [[lin.name, lin.in_features, lin.out_features, lin.bias]
                                                   for lin in self.linears],
                "output_head": self.output_head, "not_quantized": sorted(self.not_quantized),
                "num_heads": self.num_heads}

    @classmethod
    def from_dict(cls, d: dict, config=None) -> "ModelShape":
        return cls(config=config, linears=[Linear(*lin) for lin in d["linears"]],
                   not_quantized=set(d["not_quantized"]),
                   **{k: v for k, v in d.items() if k not in ("linears", "not_quantized")})

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def linear_weight_names(self) -> dict[str, Linear]:
        return {f"{lin.name}.weight": lin for lin in self.linears}

    def layer_linears(self) -> list[Linear]:
        """Linears inside decoder layer 0 (all layers are assumed alike, as in every supported family)."""
        prefix = f"{self.layers_path}.0."
        return [lin for lin in self.linears if lin.name.startswith(prefix)]

    def layer_params(self) -> int:
        prefix = f"{self.layers_path}.0."
        return sum(n for name, n in self.params.items() if name.startswith(prefix))

    def quantizable(self) -> list[Linear]:
        """Linears that bitsandbytes replaces with 8/4-bit layers."""
        return [lin for lin in self.linears if _should_convert(lin.name, self.not_quantized)]

    def lora_targets(self, target_modules) -> list[Linear]:
        """The linears peft puts an adapter on: 'all-linear' = every linear but the output head; a list of
        names matches a module whose name is the entry or ends with '.' + entry (peft's rule)."""
        if target_modules == "all-linear":
            return [lin for lin in self.linears if lin.name != self.output_head]
        wanted = list(target_modules)
        return [lin for lin in self.linears if any(lin.name == t or lin.name.endswith("." + t) for t in wanted)]


def _should_convert(name: str, skip: set[str]) -> bool:
    # transformers' should_convert_module: a key matches from the start up to a module boundary, or as a suffix.
    return not any(re.match(rf"(?:{re.escape(k)})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(k) for k in skip)


# ---- the config ----------------------------------------------------------------------------------------------
def raw_config(model_section, config_path: str | Path | None = None) -> tuple[dict, str] | None:
    """(config.json as a dict, where from) when it is a local file, read without importing transformers (the
    key of the estimate's disk cache); None for hub ids and GGUF folders (:func:`load_config` reads those)."""
    if config_path is not None:
        path = Path(config_path).expanduser()
        file, source = (path / "config.json" if path.is_dir() else path), f"--model-config {config_path}"
    else:
        path = Path(model_section.name_or_path).expanduser()
        file, source = path / "config.json", "model.name_or_path"
        if not (path.is_dir() and file.is_file()):
            return None
    try:
        return json.loads(file.read_text(encoding="utf-8")), f"{source}: {file}"
    except FileNotFoundError:
        raise ModelError(f"{source}: {file} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{source}: {file} is not a readable config.json ({exc})") from None


def config_from_raw(raw: dict, source: str):
    """The transformers config of a config.json dict (built-in class of its model_type, no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return _config_from_dict(raw, CONFIG_MAPPING, source)


def load_config(model_section, config_path: str | Path | None = None):
    """The transformers config for the recipe's model, without weights and without remote code."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config_path is not None:
        path = Path(config_path).expanduser()
        file = path / "config.json" if path.is_dir() else path
        return _config_from_file(file, CONFIG_MAPPING, f"--model-config {config_path}")
    name = model_section.name_or_path
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _config_from_file(path / "config.json", CONFIG_MAPPING, "model.name_or_path")
    if path.is_dir() and model_section.gguf_file:
        try:  # a GGUF folder without config.json: transformers reads the config from the GGUF metadata
            return AutoConfig.from_pretrained(str(path), gguf_file=model_section.gguf_file)
        except Exception as exc:
            raise ModelError(f"model.gguf_file: cannot read a config from {path / model_section.gguf_file}: "
                             f"{_first_line(exc)}") from None
    if name.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"model.name_or_path: '{name}' has no config.json; pass --model-config PATH")
    kwargs = {"revision": model_section.revision} if model_section.revision else {}
    try:
        # Remote code never runs here: only the config.json is read, and its model_type picks a built-in class.
        raw, _ = AutoConfig.get_config_dict(name, **kwargs)
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: cannot read the config of '{name}' ({_first_line(exc)}); without network or "
            "hub cache, pass --model-config with a config.json (bench/configs/ has those of the shipped recipes)"
        ) from None
    return _config_from_dict(raw, CONFIG_MAPPING, name)


def _config_from_file(file: Path, mapping, source: str):
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{source}: {file} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{source}: {file} is not a readable config.json ({exc})") from None
    return _config_from_dict(raw, mapping, str(file))


def _config_from_dict(raw: dict, mapping, source: str):
    model_type = raw.get("model_type")
    if model_type not in mapping:
        raise ModelError(f"{source}: model_type {model_type!r} is not one transformers knows; the estimate builds "
                         "only built-in architectures")
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "transformers_version", "_comment")}
    return mapping[model_type].from_dict(raw)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- the meta build -------------------------------------------------------------------------------------------
def build_meta_model(config, dtype):
    """The causal LM on the meta device: every tensor has a shape and a dtype and no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise ModelError(f"cannot build a {config.model_type} causal LM from its config: {_first_line(exc)}") from None
    model.eval()
    return model


def decoder_layers(model, num_layers: int) -> tuple[str, Any]:
    """The ModuleList holding the decoder layers: the largest list of ``num_layers`` modules."""
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise ModelError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")
    return best[0], best[1]


def is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module) -> tuple[int, int]:
    """(in, out) of an nn.Linear, or of transformers' Conv1D (weight stored transposed: (in, out))."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def shape_of(model) -> ModelShape:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = int(text.num_hidden_layers)
    layers_path, _ = decoder_layers(model, num_layers)
    params: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:  # tied weights (lm_head = embeddings) once
            seen.add(id(p))
            params[name] = p.numel()
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    linears = []
    for name, module in model.named_modules():
        if is_linear(module):
            i, o = linear_dims(module)
            linears.append(Linear(name, i, o, getattr(module, "bias", None) is not None))
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    skip = {k.removesuffix(".weight") for k in (*tied.keys(), *tied.values())}
    last_param = list(dict(model.named_parameters()).keys())[-1]
    skip.add(last_param.rsplit(".", 1)[0])
    if head_name:
        skip.add(head_name)
    return ModelShape(
        config=config, model_type=config.model_type, architecture=type(model).__name__,
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "eager"),
        hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size), num_layers=num_layers,
        layers_path=layers_path, params=params, linears=linears, output_head=head_name, not_quantized=skip,
        num_heads=int(getattr(text, "num_attention_heads", 1) or 1))
