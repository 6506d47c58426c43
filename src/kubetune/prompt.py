"""The prompt contract: the template a model was trained with travels with it.

The original notebook trained with one template and inferred with another. Here the fine-tune saves its
template (and its hash) next to the adapter; merge and quantize copy it forward; infer and evaluate read it
from the model they use and refuse a recipe whose template differs, unless ``prompt.allow_mismatch`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import ArtifactError

PROMPT_FILE = "kubetune_prompt.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptTemplate:
    template: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def format(self, context: str, question: str) -> str:
        return self.template.format(context=context.strip(), question=question.strip())

    def save(self, folder: Path) -> None:
        (Path(folder) / PROMPT_FILE).write_text(
            json.dumps({"template": self.template, "sha256": self.sha256}, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "PromptTemplate | None":
        path = Path(folder) / PROMPT_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        prompt = cls(data["template"])
        if prompt.sha256 != data.get("sha256"):
            raise ArtifactError(f"{path}: template does not match its recorded sha256 (file edited by hand?)")
        return prompt


def template_for(model_dir: Path | None, recipe) -> PromptTemplate:
    """The template to use with the model in ``model_dir``: the one it was trained with.

    A base model (``model_dir`` None or without a saved template) uses the recipe's template.
    """
    wanted = PromptTemplate(recipe.prompt.template)
    saved = PromptTemplate.load(model_dir) if model_dir is not None else None
    if saved is None or saved == wanted:
        return wanted
    if not recipe.prompt.allow_mismatch:
        raise ArtifactError(
            f"{Path(model_dir) / PROMPT_FILE}: the model was trained with another prompt template "
            f"(sha256 {saved.sha256[:12]} ≠ recipe's {wanted.sha256[:12]}); set prompt.allow_mismatch: true "
            "to use the recipe's template anyway")
    log.warning("prompt.allow_mismatch: using the recipe's template, not the one %s was trained with", model_dir)
    return wanted
