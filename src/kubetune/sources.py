"""Where a recipe's model and data come from: the hub, or a folder that must be where the pods can read it.

The stages decide at run time (a name that exists as a folder is a folder); these rules decide before anything
runs, from the text alone, as the pipeline on Kubernetes must: which names the fetch stage downloads, and which
local paths `kubetune submit` checks against the claim. A path starts with ``.``, ``/`` or ``~`` or has more than
one ``/``; anything else of the form ``name`` or ``org/name`` is a hub id.
"""

from __future__ import annotations

import re
from posixpath import isabs, join, normpath

from kubetune.config import FETCH_STAGE
from kubetune.data import BUILTIN_PREFIX, FILE_BUILDERS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # the hub's repo names: at most one '/'


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(text)


def hub_model(name_or_path: str) -> str | None:
    """The hub id that ``model.name_or_path`` names, or None for a folder."""
    return None if _looks_like_path(name_or_path) else name_or_path


def hub_dataset(source: str) -> str | None:
    """The hub data set id that ``data.source`` names, or None for the builtin generator or a file/folder."""
    if source.startswith(BUILTIN_PREFIX) or _looks_like_path(source):
        return None
    if any(source.lower().endswith(suffix) for suffix in FILE_BUILDERS):
        return None
    return source


def hub_sources(recipe) -> dict[str, str]:
    """{"model": hub id, "data": hub data set id}, for those of the two that name the hub."""
    found = {"model": hub_model(recipe.model.name_or_path), "data": hub_dataset(recipe.data.source)}
    return {what: repo for what, repo in found.items() if repo}


def pod_stages(recipe) -> list[str]:
    """The recipe's pipeline on Kubernetes: ``fetch`` first when it names the hub, then its own stages."""
    return ([FETCH_STAGE] if hub_sources(recipe) else []) + list(recipe.stages)


def local_paths(recipe) -> dict[str, str]:
    """{recipe field: path} of the model and data that are read from a folder or file, not the hub."""
    found = {}
    if hub_model(recipe.model.name_or_path) is None:
        found["model.name_or_path"] = recipe.model.name_or_path
    source = recipe.data.source
    if not source.startswith(BUILTIN_PREFIX) and hub_dataset(source) is None:
        found["data.source"] = source
    return found


def on_claim(path: str, mount_path: str) -> str | None:
    """Where ``path`` lies on the claim (relative to it), as a pod whose working directory is the claim's
    ``mount_path`` reads it; None when it lies outside the claim (``../shared/x``, ``/data/x``, ``~/x``)."""
    if path.startswith("~"):
        return None  # the image's home, which is not on the claim
    mount = normpath(mount_path)
    absolute = normpath(path if isabs(path) else join(mount, path))
    if absolute == mount:
        return "."
    if not absolute.startswith(mount.rstrip("/") + "/"):
        return None
    return absolute[len(mount.rstrip("/")) + 1:]
