"""Kubernetes objects that a recipe carries whole (tolerations, affinity, env, volumes), checked when the recipe is
validated, rendered or submitted, not first by the API server (which refuses the Job: for a GPU stage's Job that is
the driver, halfway through the run).

The check is the kubernetes client's own models (pydantic, extra fields forbidden): strict types, the API's field
names only (``tolerationSeconds``, not the client's ``toleration_seconds``), required fields present. The recipe
schema keeps these settings as plain JSON values, so that the chart's values schema and a recipe load stay light;
importing the models takes ~2 s, paid only when such a setting differs from its default.
"""

from __future__ import annotations

from kubetune.config import KubernetesSection, Recipe
from kubetune.errors import RecipeError

# recipe setting -> (the kubernetes client model of each object, whether the setting is a list of them)
EMBEDDED = {"tolerations": ("V1Toleration", True), "gpu_tolerations": ("V1Toleration", True),
            "affinity": ("V1Affinity", False), "env": ("V1EnvVar", True), "env_from": ("V1EnvFromSource", True),
            "extra_volumes": ("V1Volume", True), "extra_volume_mounts": ("V1VolumeMount", True)}


def embedded_problems(recipe: Recipe) -> list[str]:
    """``kubernetes.<setting>.<index>.<field>: <problem>`` for every embedded object the API server would refuse."""
    from pydantic import ValidationError

    defaults = KubernetesSection()
    problems = []
    for setting, (model_name, many) in EMBEDDED.items():
        value = getattr(recipe.kubernetes, setting)
        if not value or value == getattr(defaults, setting):
            continue
        from kubetune.k8s.api import object_model

        model = object_model(model_name)
        for index, item in enumerate(value if many else [value]):
            where = f"kubernetes.{setting}" + (f".{index}" if many else "")
            try:
                parsed = model.model_validate(item, strict=True)
            except ValidationError as exc:
                for err in exc.errors():
                    field = ".".join(str(part) for part in err["loc"])
                    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                    problems.append(f"{where}.{field}: {message} (a {model_name[2:]} object)")
                continue
            # the models also take the client's Python names, which the API server does not know
            renamed = _python_name(item, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))
            if renamed:
                problems.append(f"{where}.{renamed}: unknown field (a {model_name[2:]} object's fields are named as "
                                "in the Kubernetes API: camelCase, as `kubectl explain` shows them)")
    return problems


def _python_name(raw, dumped, prefix: str = "") -> str | None:
    """The path of the first key in ``raw`` that its model's API-named dump does not have."""
    if isinstance(raw, dict) and isinstance(dumped, dict):
        for key, value in raw.items():
            if key not in dumped:
                return prefix + key
            found = _python_name(value, dumped[key], f"{prefix}{key}.")
            if found:
                return found
    if isinstance(raw, list) and isinstance(dumped, list):
        for index, (value, out) in enumerate(zip(raw, dumped)):
            found = _python_name(value, out, f"{prefix}{index}.")
            if found:
                return found
    return None


def check_embedded(recipe: Recipe, source: str) -> Recipe:
    """``recipe``, or a RecipeError listing every embedded object's problems."""
    problems = embedded_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe
