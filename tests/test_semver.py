"""One semantic-version rule for the project file, the bundle check and the device's ordering."""

from __future__ import annotations

import pytest

import bundles
from edgepack.project import validate_project
from edgepack_runtime.semver import is_valid, precedence

# semver.org 2.0.0, section 11: each sorts before the next.
ORDERED = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
           "1.0.0-rc.1", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0", "1.0.1", "1.2.0", "2.0.0"]


def test_precedence_follows_semver_org_including_numeric_prerelease_identifiers():
    keys = [precedence(v) for v in ORDERED]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@pytest.mark.parametrize("bad", ["1.0.0-rc.01", "1.0.0\n", " 1.0.0", "01.0.0", "1.0", "1.0.0-", "1.0.0-rc..1", "1.0.0+build"])
def test_project_refuses_a_version_the_bundle_writer_would_refuse_after_the_whole_build(bad):
    """Was: "1.0.0-rc.01" and "1.0.0\\n" passed project validation and failed only when the bundle was written."""
    assert not is_valid(bad)
    problems = validate_project({"name": "x", "version": bad})
    assert any(p.startswith("version:") for p in problems), problems


def test_device_takes_rc10_after_rc2_as_an_upgrade_and_refuses_the_reverse(tmp_path):
    """Was: the cache ordered 1.0.0-rc.10 before 1.0.0-rc.2 (string compare) and refused the upgrade as older."""
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.errors import UpdateError
    from edgepack_runtime.model import RuntimeConfig, install

    priv, pub = bundles.keys(tmp_path)
    config = RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(pub),)))
    # allow_downgrade=False: the check the OTA client relies on (a local install may downgrade on purpose).
    install(bundles.make_bundle(tmp_path, priv, "1.0.0-rc.2", bundles.raw_classifier()), config, allow_downgrade=False)
    install(bundles.make_bundle(tmp_path, priv, "1.0.0-rc.10", bundles.raw_classifier(scale=2.0)), config, allow_downgrade=False)
    with pytest.raises(UpdateError, match="older"):
        install(bundles.make_bundle(tmp_path, priv, "1.0.0-rc.3", bundles.raw_classifier(scale=3.0)), config, allow_downgrade=False)
