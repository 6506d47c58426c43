"""kubetune's own image: which references to it can be pulled, and what to do until one can.

The recipe default (``kubernetes.image``) and the chart name ``ghcr.io/kubetune/kubetune``. Until the release
workflow (.github/workflows/release.yaml) has pushed a tag there, every pod that names it would sit in
ImagePullBackOff, so ``kubetune submit`` refuses it before creating anything and says how to build and push
an image of one's own (images/README.md). ``render`` still renders it: the output is a template to edit.
"""

from __future__ import annotations

from kubetune.errors import ImageError

PROJECT_REPOSITORY = "ghcr.io/kubetune/kubetune"
# Tags the release workflow has pushed, each with its digest; empty until the first release. Adding one here
# (and pinning the recipe default and the chart to its digest) is part of a release.
PUBLISHED: dict[str, str] = {}
BUILD_AND_PUSH = ("make images IMAGE=REGISTRY/kubetune:TAG && podman push REGISTRY/kubetune:TAG "
                  "(or CONTAINER=docker, docker push)")


def split_reference(image: str) -> tuple[str, str | None, str | None]:
    """``registry/name:tag@digest`` -> (repository, tag or None, digest or None)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a colon before the last slash belongs to the registry's port
        return name[:colon], name[colon + 1:], digest or None
    return name, None, digest or None


def is_unpublished(image: str) -> bool:
    """A reference to kubetune's repository by a tag that was never pushed there (a digest is taken on trust)."""
    repository, tag, digest = split_reference(image)
    return repository == PROJECT_REPOSITORY and digest is None and (tag or "latest") not in PUBLISHED


def require_published(image: str) -> None:
    """Raise ImageError for a kubetune image that no registry has: its pods could never start."""
    if is_unpublished(image):
        raise ImageError(f"kubernetes.image: {image} has not been published (kubetune has released no image "
                         f"yet), so no pod could pull it; build and push your own with `{BUILD_AND_PUSH}`, then "
                         "submit with --set kubernetes.image=REGISTRY/kubetune:TAG (images/README.md)")
