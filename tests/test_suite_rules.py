"""Rules of the test suite itself: in CI (KUBETUNE_REQUIRE_SERVERS=1) nothing a test needs may be missing unseen."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_skips_over_a_missing_package():
    """A package the tests need is pinned (pyproject.toml) and imported plainly, so that its absence fails the
    suite; ``pytest.importorskip`` would turn it into a silent skip in CI. Missing binaries go through
    conftest.require_binary, which fails under KUBETUNE_REQUIRE_SERVERS=1."""
    offenders = [f"{path.relative_to(TESTS)}:{number}" for path in sorted(TESTS.rglob("*.py"))
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if "importorskip(" in line and path.name != Path(__file__).name]
    assert not offenders, f"importorskip in {offenders}"
