"""Device cache: verified installs, A/B slots, fallback and rollback (in process)."""

from __future__ import annotations

import numpy as np
import pytest

import bundles
import edgepack_runtime
from edgepack_runtime.bundle import load_public_key
from edgepack_runtime.cache import Cache, CacheConfig
from edgepack_runtime.errors import UpdateError, VerificationError
from edgepack_runtime.model import RuntimeConfig, install, load


@pytest.fixture
def env(tmp_path):
    priv, pub = bundles.keys(tmp_path)
    config = RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(pub),)))
    return tmp_path, priv, config


def test_install_then_open_serves_the_bundle(env):
    tmp, key, config = env
    slot = install(bundles.make_bundle(tmp, key), config)
    model = load(config)
    assert model.version == "1.0.0" and model.slot == slot
    out = model.predict(np.array([[0, 255, 10, 20]], np.uint8))
    assert out["scores"].shape == (1, 3)


def test_bundle_failing_its_self_test_never_becomes_current(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key, "1.0.0"), config)
    bad = bundles.make_bundle(tmp, key, "2.0.0", bundles.raw_classifier(seed=0), golden_model=bundles.raw_classifier(seed=9))
    with pytest.raises(UpdateError, match="self-test"):
        install(bad, config)
    assert load(config).version == "1.0.0"


def test_bundle_signed_by_an_unpinned_key_is_refused_before_writing(env, tmp_path):
    tmp, _, config = env
    (tmp_path / "other").mkdir()
    other_key, _ = bundles.keys(tmp_path / "other")
    with pytest.raises(VerificationError):
        install(bundles.make_bundle(tmp_path / "other", other_key), config)
    assert not (config.cache.root / "store").exists() or not any((config.cache.root / "store").iterdir())


def test_corrupted_current_model_falls_back_to_previous_and_says_so(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key, "1.0.0"), config)
    slot2 = install(bundles.make_bundle(tmp, key, "2.0.0", bundles.raw_classifier(scale=2.0)), config)
    model_file = config.cache.root / "store" / slot2.digest / "models" / "onnx-fp32.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    model = load(config)
    assert model.version == "1.0.0"
    assert any("fell back" in n for n in model.notes) and any("onnx-fp32.onnx" in n for n in model.notes)
    assert Cache(config.cache).read_slot("current").version == "1.0.0"


def test_rollback_swaps_slots(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key, "1.0.0"), config)
    install(bundles.make_bundle(tmp, key, "1.1.0", bundles.raw_classifier(scale=3.0)), config)
    cache = Cache(config.cache)
    assert cache.rollback().version == "1.0.0"
    assert load(config).version == "1.0.0"
    assert cache.read_slot("previous").version == "1.1.0"


def test_rollback_without_previous_is_a_clear_error(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key), config)
    with pytest.raises(UpdateError, match="no previous"):
        Cache(config.cache).rollback()


def test_downgrade_refused_unless_explicit(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key, "2.0.0"), config)
    with pytest.raises(UpdateError, match="older"):
        install(bundles.make_bundle(tmp, key, "1.0.0", bundles.raw_classifier(scale=5.0)), config, allow_downgrade=False)


def test_store_keeps_only_the_last_known_good_bundles(env):
    tmp, key, config = env
    for i in range(6):
        install(bundles.make_bundle(tmp, key, f"1.{i}.0", bundles.raw_classifier(scale=1.0 + i)), config)
    status = Cache(config.cache).status()
    assert len(status["store"]) == config.cache.keep
    assert status["current"]["version"] == "1.5.0" and status["previous"]["version"] == "1.4.0"


def test_open_with_nothing_installed_says_what_to_do(env):
    _, _, config = env
    with pytest.raises(UpdateError, match="install"):
        load(config)


@pytest.mark.parametrize("raw,field", [
    (np.array([[1, 2, 3]], np.uint8), "raw"),                 # wrong width
    (np.array([[1.5, 2, 3, 4]]), "raw"),                       # not integers
    (np.array([[300, 2, 3, 4]]), "raw"),                       # out of uint8 range
    ({"raw": [[1, 2, 3, 4]], "extra": [1]}, "extra"),         # unknown input
    ({"nope": [[1, 2, 3, 4]]}, "nope"),
])
def test_invalid_input_is_rejected_with_the_field_and_never_run(env, raw, field):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key), config)
    model = load(config)
    calls = []
    original = model.session.run
    model.session.run = lambda feed: calls.append(feed) or original(feed)
    with pytest.raises(edgepack_runtime.InputValidationError) as info:
        model.predict(raw)
    assert info.value.field == field
    assert not calls


def test_json_lists_are_accepted_when_exact(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key), config)
    out = load(config).predict({"raw": [[0, 1, 2, 3], [4, 5, 6, 7]]})
    assert out["scores"].shape == (2, 3)


def test_public_open_reads_pinned_keys_from_the_cache(env):
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key), config)
    (config.cache.root / "keys").mkdir()
    (config.cache.root / "keys" / "pub.pub").write_bytes((tmp / "test.pub").read_bytes())
    assert edgepack_runtime.open(config.cache.root).version == "1.0.0"


def test_damaged_unreferenced_store_entry_does_not_block_installing_that_bundle(env):
    # Power loss can keep a store directory's rename but lose its data; the next
    # install of the same bundle must re-extract instead of failing forever.
    tmp, key, config = env
    install(bundles.make_bundle(tmp, key, "1.0.0"), config)
    bundle2 = bundles.make_bundle(tmp, key, "2.0.0", bundles.raw_classifier(scale=2.0))
    from edgepack_runtime.cache import file_sha256

    entry = config.cache.root / "store" / file_sha256(bundle2)
    (entry / "models").mkdir(parents=True)
    (entry / "models" / "onnx-fp32.onnx").write_bytes(b"garbage")
    assert install(bundle2, config).version == "2.0.0"
    assert load(config).version == "2.0.0"


def test_reinstalling_the_current_bundle_records_it_as_known_good(env):
    tmp, key, config = env
    bundle = bundles.make_bundle(tmp, key, "1.0.0")
    slot = install(bundle, config)
    (config.cache.root / "slots" / "known-good").unlink()  # as after a kill at "gc"
    install(bundle, config)
    assert Cache(config.cache).known_good() == [slot.digest]
