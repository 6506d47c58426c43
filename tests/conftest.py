from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The estimator's shape cache (kubetune.estimate.cache) goes to a folder of this test session, never ~/.cache.
os.environ["KUBETUNE_ESTIMATE_CACHE"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"kubetune-test-estimate-cache-{os.getpid()}")

from tiny import build_tiny_model, tiny_recipe_dict  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """Factory: tiny_recipe(**sections) -> validated Recipe writing under tmp_path/artifacts."""
    from kubetune.config import recipe_from_dict

    def make(**sections):
        return recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts", **sections))

    return make


def require_binary(name: str) -> str:
    """Path of an external tool; skip with a reason on a laptop, fail in CI (KUBETUNE_REQUIRE_SERVERS=1)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found on PATH (.ci/run installs it)"
    if os.environ.get("KUBETUNE_REQUIRE_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)
