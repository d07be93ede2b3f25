"""``open(cache_dir)`` → a verified, self-tested model whose ``predict`` takes raw input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Manifest, PublicKey, load_public_key
from .cache import DEFAULT_ROOT, Cache, CacheConfig, Slot
from .engines import available_engines, choose_variant, cpu_features, load_session
from .errors import UpdateError
from .selftest import self_test
from .validate import check_feed


@dataclass(frozen=True)
class RuntimeConfig:
    """How the device runs bundles.

    Attributes:
        cache: Cache location, pinned keys, retention.
        engines: Engines allowed, best first (None: every installed one).
        prefer: Variant ids to prefer, in order, over the default ranking.
        threads: Inference threads.
    """

    cache: CacheConfig
    engines: Optional[Tuple[str, ...]] = None
    prefer: Tuple[str, ...] = ()
    threads: int = 1


def _pick(manifest: Mapping, config: RuntimeConfig) -> dict:
    engines = list(config.engines) if config.engines else available_engines()
    variant = choose_variant(manifest.get("variants", []), engines, cpu_features(), config.prefer)
    if variant is None:
        offered = sorted({v.get("engine") for v in manifest.get("variants", [])})
        raise UpdateError(f"No variant of {manifest.get('name')} runs here: it offers engines {offered}, this device has {engines or 'none'}.")
    return variant


def _tester(config: RuntimeConfig, loaded: Optional[Dict[Path, Tuple[dict, Any]]] = None):
    """The self-test the cache runs; keeps the session it loaded in ``loaded`` for reuse."""
    def test(directory: Path, manifest: Manifest) -> None:
        variant = _pick(manifest, config)
        session = load_session(variant["engine"], directory / variant["file"], config.threads)
        self_test(session, variant["id"], directory, manifest)
        if loaded is not None:
            loaded[directory] = (variant, session)

    return test


class Model:
    """A verified bundle loaded for inference."""

    def __init__(self, slot: Slot, directory: Path, manifest: Manifest, variant: dict, session, notes: List[str]) -> None:
        self.slot = slot
        self.directory = directory
        self.manifest = manifest
        self.variant = variant
        self.session = session
        self.notes = notes
        self.inputs: List[Mapping[str, Any]] = list((manifest.get("io") or {}).get("inputs") or [])
        self.output_names: List[str] = list(session.output_names)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def validate(self, raw: Union[np.ndarray, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Check raw input against the manifest schema (raises InputValidationError)."""
        feed = raw if type(raw) is dict or (not isinstance(raw, np.ndarray) and isinstance(raw, Mapping)) else {self.session.input_names[0]: raw}
        if not self.inputs:
            return {k: np.asarray(v) for k, v in feed.items()}
        return check_feed(self.inputs, feed)

    def predict(self, raw: Union[np.ndarray, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Run the model on raw input (an array for single-input models, or a dict by name).

        Raises:
            InputValidationError: The input does not match the manifest's schema; the
                model is not run.
        """
        feed = self.validate(raw)
        outputs = self.session.run(feed)
        return dict(zip(self.output_names, outputs))

    def info(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.slot.digest,
            "variant": self.variant.get("id"),
            "engine": self.variant.get("engine"),
            "precision": self.variant.get("precision"),
            "io": self.manifest.get("io"),
            "notes": self.notes,
        }


def load(config: RuntimeConfig) -> Model:
    """Open the cache and load the bundle to serve (falling back to previous if needed).

    Raises:
        UpdateError: No installed bundle verifies and passes its self-test.
    """
    cache = Cache(config.cache)
    loaded: Dict[Path, Tuple[dict, Any]] = {}
    slot, directory, manifest, notes = cache.open(_tester(config, loaded))
    # The session that just passed the self-test is the one that serves (no second load).
    variant, session = loaded[directory]
    return Model(slot, directory, manifest, variant, session, notes)


def open(cache_dir: Union[str, os.PathLike] = DEFAULT_ROOT, keys: Sequence[Union[str, os.PathLike, PublicKey]] = (), threads: int = 1, prefer: Sequence[str] = ()) -> Model:  # noqa: A001 - mirrors builtins.open on purpose
    """Open the model installed in ``cache_dir``.

    Args:
        cache_dir: The device cache (default ``/var/lib/edgepack``).
        keys: Pinned publisher public keys (paths or PublicKey); defaults to the
            ``*.pub`` files in ``cache_dir/keys``.
        threads: Inference threads.
        prefer: Variant ids to prefer.
    """
    root = Path(cache_dir)
    pinned = [k if isinstance(k, PublicKey) else load_public_key(k) for k in keys]
    if not pinned:
        pinned = [load_public_key(p) for p in sorted((root / "keys").glob("*.pub"))]
    config = RuntimeConfig(CacheConfig(root=root, trusted_keys=tuple(pinned)), prefer=tuple(prefer), threads=threads)
    return load(config)


def install(bundle: Union[str, os.PathLike], config: RuntimeConfig, **kwargs) -> Slot:
    """Verify, self-test and switch to ``bundle`` (see :meth:`Cache.install`)."""
    return Cache(config.cache).install(Path(bundle), _tester(config), **kwargs)
