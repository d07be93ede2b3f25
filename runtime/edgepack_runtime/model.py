"""``open(cache_dir)`` → a verified, self-tested model whose ``predict`` takes raw input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Manifest, PublicKey, load_public_key
from .cache import DEFAULT_ROOT, Cache, CacheConfig, Slot
from .arith import host_class
from .engines import available_engines, cpu_features, load_session, rank_variants
from .errors import EdgepackError, UpdateError, VerificationError
from .selftest import self_test
from .validate import ImageListFeed, InputValidationError, check_feed, check_image_list, is_image_list, run_image_list


@dataclass(frozen=True)
class RuntimeConfig:
    """How the device runs bundles.

    Attributes:
        cache: Cache location, pinned keys, retention.
        engines: Engines allowed, best first (None: every installed one).
        prefer: Variant ids to prefer, in order, over the default ranking.
        threads: Inference threads.
        arith_class: This device's arithmetic class (None: detected from /proc/cpuinfo).
        profile: A device profile id (``rpi4``): its class is read from the bundle's
            ``targets`` and overrides detection.
    """

    cache: CacheConfig
    engines: Optional[Tuple[str, ...]] = None
    prefer: Tuple[str, ...] = ()
    threads: int = 1
    arith_class: Optional[str] = None
    profile: Optional[str] = None


def device_class(manifest: Mapping, config: RuntimeConfig) -> Tuple[str, str]:
    """This device's arithmetic class for ``manifest`` and where it came from."""
    if config.profile:
        target = (manifest.get("targets") or {}).get(config.profile)
        if isinstance(target, Mapping) and isinstance(target.get("class"), str):
            return target["class"], f"profile {config.profile} (from the bundle's targets)"
        known = ", ".join(sorted(manifest.get("targets") or {})) or "none"
        raise UpdateError(f"--profile {config.profile}: {manifest.get('name')} was not built for that device "
                          f"(its targets: {known}); drop --profile to detect the CPU, or pass --class.")
    if config.arith_class:
        return config.arith_class, "given on the command line"
    return host_class(), "detected from /proc/cpuinfo"


def plan(manifest: Mapping, config: RuntimeConfig) -> Dict[str, Any]:
    """Which variants this device would serve, in order, and why others are refused (pure but for detection)."""
    klass, source = device_class(manifest, config)
    engines = list(config.engines) if config.engines else available_engines()
    ordered, refused = rank_variants(manifest.get("variants", []), engines, cpu_features(), klass, config.prefer)
    return {"class": klass, "class_source": source, "candidates": ordered, "refused": refused}


def _reason(variant: Mapping, klass: str) -> str:
    cert = (variant.get("classes") or {}).get(klass)
    if isinstance(cert, Mapping):
        acc = cert.get("accuracy")
        shown = f", accuracy {acc * 100:.2f}%" if isinstance(acc, (int, float)) else ""
        return f"certified for {klass} ({cert.get('how')}{shown}) and ranked first among those"
    if variant.get("classes") is None:
        return "the bundle predates per-class certification; ranked by precision"
    return f"fp32: float kernels, not affected by {klass}'s integer arithmetic"


def _tester(config: RuntimeConfig, loaded: Optional[Dict[Path, Tuple[dict, Any, dict]]] = None, record: bool = True):
    """The self-test the cache runs: the best variant for this device that passes its golden vectors.

    A variant that fails its self-test is skipped for the next certified one (a bundle is
    refused only when none passes); what was tried is kept in ``loaded`` for status and /info.
    """
    def test(directory: Path, manifest: Manifest) -> None:
        chosen = plan(manifest, config)
        klass, failed = chosen["class"], {}
        for variant in chosen["candidates"]:
            try:
                session = load_session(variant["engine"], directory / variant["file"], config.threads)
                self_test(session, variant["id"], directory, manifest, klass)
            except EdgepackError as exc:
                failed[variant["id"]] = str(exc)
                continue
            choice = {"class": klass, "class_source": chosen["class_source"], "variant": variant["id"],
                      "reason": _reason(variant, klass), "refused": chosen["refused"], "failed_self_test": failed}
            if loaded is not None:
                loaded[directory] = (variant, session, choice)
            if record:
                _record_choice(config.cache.root, directory.name, choice)
            return
        if failed:
            raise VerificationError("No variant passed its self-test here: " + " ".join(failed.values()))
        offered = sorted({v.get("engine") for v in manifest.get("variants", [])})
        detail = "; ".join(f"{k}: {v}" for k, v in chosen["refused"].items())
        raise UpdateError(f"No variant of {manifest.get('name')} runs here ({klass}; engines offered {offered}): {detail}.")

    return test


CHOICE_FILE = "selection.json"


def _record_choice(root: Path, digest: str, choice: dict) -> None:
    # A side file (not inside the verified bundle directory) so `status` can say what is served and why.
    try:
        import json

        from ._fs import atomic_write

        atomic_write(Path(root) / CHOICE_FILE, json.dumps({"digest": digest, **choice}, sort_keys=True).encode())
    except OSError:
        pass  # a read-only cache still serves; status then recomputes the plan


def read_choice(root: Path, digest: Optional[str]) -> Optional[dict]:
    """The recorded choice for the bundle ``digest`` (None if none or another bundle's)."""
    import json

    try:
        data = json.loads((Path(root) / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("digest") == digest else None


class Model:
    """A verified bundle loaded for inference."""

    def __init__(self, slot: Slot, directory: Path, manifest: Manifest, variant: dict, session, notes: List[str],
                 choice: Optional[dict] = None) -> None:
        self.choice = choice or {}
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

    def validate(self, raw: Union[np.ndarray, Sequence[np.ndarray], Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Check raw input against the manifest schema (raises InputValidationError).

        A list of images of different sizes for an image input (single-input models)
        comes back as an :class:`~.validate.ImageListFeed` of ``[1, H, W, C]`` arrays.
        """
        feed = raw if type(raw) is dict or (not isinstance(raw, (np.ndarray, list, tuple)) and isinstance(raw, Mapping)) else {self.session.input_names[0]: raw}
        if not self.inputs:
            return {k: np.asarray(v) for k, v in feed.items()}
        for spec in self.inputs:
            value = feed.get(spec["name"])
            if is_image_list(spec, value):
                if len(self.inputs) != 1 or len(feed) != 1:
                    raise InputValidationError(spec["name"], "a list of images of different sizes is accepted only by single-input models; send one request per size")
                return ImageListFeed({spec["name"]: check_image_list(spec, value)})
        from .stream import with_constants

        return check_feed(self.inputs, with_constants(self.inputs, feed))

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """Run a validated feed; an ImageListFeed runs each image on its own, outputs concatenated in order."""
        if type(feed) is ImageListFeed:
            return run_image_list(self.session.run, feed, self.output_names)[0]
        return self.session.run(feed)

    def predict(self, raw: Union[np.ndarray, Sequence[np.ndarray], Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Run the model on raw input (an array for single-input models, or a dict by name).

        For an image input whose preprocessing accepts a size range, ``raw`` (or the
        dict's value) may be a LIST of ``[H, W, C]`` images of different sizes: each is
        preprocessed and run on its own and the outputs are concatenated along the batch
        axis in list order.

        Raises:
            InputValidationError: The input does not match the manifest's schema (for a
                list, the error names the element, e.g. ``raw[2]``); the model is not run.
        """
        feed = self.validate(raw)
        return dict(zip(self.output_names, self.run(feed)))

    @property
    def stateful(self) -> bool:
        """True when the bundle declares state inputs (use :meth:`stream`)."""
        from .stream import layout

        return layout(self.manifest) is not None

    def stream(self):
        """A new :class:`edgepack_runtime.stream.Stream` of this stateful model, from zero state.

        ``s = model.stream(); s.feed(chunk)`` runs one chunk (raw input array, or a dict
        with the other per-call inputs) and carries the state to the next ``feed``.

        Raises:
            EdgepackError: The bundle declares no state (call ``predict``).
        """
        from .stream import Stream, layout

        declared = layout(self.manifest)
        if declared is None:
            raise EdgepackError(f"{self.name} {self.version} declares no state; call predict() instead of stream().")
        return Stream(self.inputs, self.output_names, self.session.run, declared)

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
            "arith_class": self.choice.get("class"),
            "choice": self.choice,
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
    variant, session, choice = loaded[directory]
    return Model(slot, directory, manifest, variant, session, notes, choice)


def open(cache_dir: Union[str, os.PathLike] = DEFAULT_ROOT, keys: Sequence[Union[str, os.PathLike, PublicKey]] = (), threads: int = 1, prefer: Sequence[str] = (),  # noqa: A001 - mirrors builtins.open on purpose
         arith_class: Optional[str] = None, profile: Optional[str] = None) -> Model:
    """Open the model installed in ``cache_dir``.

    Args:
        cache_dir: The device cache (default ``/var/lib/edgepack``).
        keys: Pinned publisher public keys (paths or PublicKey); defaults to the
            ``*.pub`` files in ``cache_dir/keys``.
        threads: Inference threads.
        prefer: Variant ids to prefer.
        arith_class: This device's arithmetic class (default: detected).
        profile: A device profile id the bundle was built for; its class overrides detection.
    """
    root = Path(cache_dir)
    pinned = [k if isinstance(k, PublicKey) else load_public_key(k) for k in keys]
    if not pinned:
        pinned = [load_public_key(p) for p in sorted((root / "keys").glob("*.pub"))]
    config = RuntimeConfig(CacheConfig(root=root, trusted_keys=tuple(pinned)), prefer=tuple(prefer), threads=threads,
                           arith_class=arith_class, profile=profile)
    return load(config)


def install(bundle: Union[str, os.PathLike], config: RuntimeConfig, **kwargs) -> Slot:
    """Verify, self-test and switch to ``bundle`` (see :meth:`Cache.install`)."""
    return Cache(config.cache).install(Path(bundle), _tester(config), **kwargs)
