"""Model folders that kubetune must refuse by default: one that needs remote code, one with only pickle weights.

Both are the tiny model underneath, so that when the recipe does allow them (trust_remote_code, allow_pickle)
they load and train like it. The remote code writes a sentinel file when it is imported: its absence proves that
it never ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SENTINEL = "REMOTE_CODE_RAN"

_CONFIGURATION = '''
from pathlib import Path

from transformers import LlamaConfig

Path({sentinel!r}).write_text("imported\\n")  # proof that code shipped with the model ran


class KubetuneCustomConfig(LlamaConfig):
    model_type = "kubetune-custom"
'''

_MODELING = '''
from pathlib import Path

from transformers import LlamaForCausalLM

from .configuration_custom import KubetuneCustomConfig

Path({sentinel!r}).write_text("imported\\n")  # proof that code shipped with the model ran


class KubetuneCustomModel(LlamaForCausalLM):
    config_class = KubetuneCustomConfig
'''


def build_remote_code_model(tiny: Path, dest: Path, sentinel: Path) -> Path:
    """The tiny model behind an ``auto_map`` to classes defined in Python files of the folder."""
    shutil.copytree(tiny, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="kubetune-custom", architectures=["KubetuneCustomModel"],
                  auto_map={"AutoConfig": "configuration_custom.KubetuneCustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.KubetuneCustomModel"})
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    (dest / "configuration_custom.py").write_text(_CONFIGURATION.format(sentinel=str(sentinel)))
    (dest / "modeling_custom.py").write_text(_MODELING.format(sentinel=str(sentinel)))
    return dest


def build_pickle_model(tiny: Path, dest: Path) -> Path:
    """The tiny model with its weights as ``pytorch_model.bin`` (a torch pickle) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny, dest)
    state = {}
    for file in sorted(dest.glob("*.safetensors")):
        state.update(load_file(file))
        file.unlink()
    for index in dest.glob("*.safetensors.index.json"):
        index.unlink()
    torch.save(state, dest / "pytorch_model.bin")
    return dest
