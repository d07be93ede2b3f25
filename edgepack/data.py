"""Calibration and validation datasets, read lazily in batches.

A dataset maps each model input name to a stream of samples. Readers are plug-ins in
:data:`READERS` keyed by what the path looks like; each returns a :class:`Dataset`
that never holds more than one batch in memory (``.npy`` files are memory-mapped,
large ``.npz`` members are spilled to a memory-mapped temp file, images are decoded
one batch at a time).

Layout conventions:
    * ``.npy``: one array ``[n, *sample_shape]`` for a single-input model.
    * ``.npz``: one array per model input, keyed by input name (a single-input model
      also accepts the only non-label key), plus optional ``labels`` (``y`` also
      accepted) of shape ``[n]``.
    * a directory of images (png/jpg/jpeg/bmp): decoded, converted to RGB (or gray
      for 1-channel inputs), resized to the model's spatial size. uint8 inputs get raw
      pixels; float inputs get pixels/255. Images inside class sub-folders are labelled
      by the sorted folder names.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .modelio import TensorSpec

LABEL_KEYS = ("labels", "y")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# An npz member bigger than this is spilled to disk and memory-mapped instead of loaded.
_SPILL_BYTES = 64 * 1024**2

Batch = dict[str, np.ndarray]


@dataclass
class Dataset:
    """Samples for every model input, plus optional labels, read a batch at a time.

    Attributes:
        source: Where the data came from (for messages and lineage).
        length: Number of samples.
        labels: Integer class labels of length ``length``, or None.
    """

    source: str
    length: int
    _take: Callable[[int, int], Batch]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.length

    def batch(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` as a feed dict."""
        return self._take(start, min(stop, self.length))

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[int, Batch]]:
        """Yield ``(start, feed)`` pairs covering the first ``limit`` samples."""
        end = self.length if limit is None else min(limit, self.length)
        for start in range(0, end, batch_size):
            yield start, self.batch(start, min(start + batch_size, end))


def _spill_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="edgepack-data-"))
    atexit.register(shutil.rmtree, directory, True)
    return directory


def _fit_array(array: np.ndarray, spec: TensorSpec, source: str, key: str) -> np.ndarray:
    """Check one input array against the model input; return it ready to slice."""
    if array.ndim == 0:
        if spec.shape == ():
            return array  # a scalar input: the one value goes with every sample
        raise DataError(f"{source}: '{key}' is a scalar; it must hold one sample per row, shaped [n, ...].")
    if spec.shape is not None:
        want = spec.sample_shape
        got = array.shape[1:]
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            dims = ", ".join("?" if w is None else str(w) for w in want)
            raise DataError(
                f"{source}: '{key}' has samples of shape {tuple(got)} but model input '{spec.name}' expects ({dims}); "
                "reshape the data so that it is [n, " + dims + "]."
            )
    if spec.dtype is not None and array.dtype != spec.dtype:
        if spec.dtype.kind == "f" and array.dtype.kind in "fiub":
            pass  # safe widening/narrowing to float happens per batch
        elif spec.dtype.kind in "iu" and array.dtype.kind in "iu":
            pass
        elif spec.dtype.kind == "b" and array.dtype.kind == "b":
            pass
        else:
            raise DataError(
                f"{source}: '{key}' has dtype {array.dtype} but model input '{spec.name}' expects {spec.dtype}; "
                f"convert the data to {spec.dtype}."
            )
    return array


def _labels(array: np.ndarray | None, length: int, source: str) -> np.ndarray | None:
    if array is None:
        return None
    labels = np.asarray(array)
    if labels.ndim != 1 or labels.shape[0] != length:
        raise DataError(f"{source}: 'labels' must be a 1-D array with one entry per sample ({length}), got shape {labels.shape}.")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: 'labels' must be integer class indices, got dtype {labels.dtype}.")
    return labels.astype(np.int64)


def _array_dataset(source: str, arrays: dict[str, np.ndarray], labels: np.ndarray | None, inputs: Sequence[TensorSpec]) -> Dataset:
    # A 0-d array for a 0-d (scalar) model input is the same for every sample, e.g. a sample rate.
    scalars = {k: a for k, a in arrays.items() if a.ndim == 0}
    arrays = {k: a for k, a in arrays.items() if a.ndim != 0}
    if not arrays:
        raise DataError(f"{source} holds only scalars ({', '.join(scalars)}); add the per-sample inputs [n, ...].")
    lengths = {key: a.shape[0] for key, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{source}: inputs have different sample counts {lengths}; every input needs one row per sample.")
    length = next(iter(lengths.values()))
    if length == 0:
        raise DataError(f"{source} is empty (0 samples); provide at least one sample.")
    dtypes = {spec.name: spec.dtype for spec in inputs}

    def take(start: int, stop: int) -> Batch:
        feed = {}
        for name, array in arrays.items():
            chunk = np.asarray(array[start:stop])
            want = dtypes.get(name)
            feed[name] = np.ascontiguousarray(chunk.astype(want, copy=False) if want is not None else chunk)
        for name, value in scalars.items():
            want = dtypes.get(name)
            feed[name] = np.array(value, dtype=want if want is not None else value.dtype)
        return feed

    return Dataset(source, length, take, _labels(labels, length, source))


def _read_npy(path: Path, inputs: Sequence[TensorSpec]) -> Dataset:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{path} is a single .npy array but the model has {len(inputs)} inputs ({names}); use an .npz keyed by input name.")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc}); save it with numpy.save.") from exc
    return _array_dataset(str(path), {inputs[0].name: _fit_array(array, inputs[0], str(path), "array")}, None, inputs)


def _npz_member(archive: zipfile.ZipFile, npz: np.lib.npyio.NpzFile, key: str, spill: Callable[[], Path]) -> np.ndarray:
    info = archive.getinfo(key + ".npy")
    if info.file_size <= _SPILL_BYTES:
        return npz[key]
    target = spill() / (key.replace("/", "_") + ".npy")
    with archive.open(info) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
    return np.load(target, mmap_mode="r", allow_pickle=False)


def _read_npz(path: Path, inputs: Sequence[TensorSpec], key: str | None = None, labels_key: str | None = None) -> Dataset:
    source = str(path)
    try:
        npz = np.load(path, allow_pickle=False)
        archive = zipfile.ZipFile(path)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{source} is not a readable .npz archive ({exc}); save it with numpy.savez.") from exc
    with npz, archive:
        keys = list(npz.files)
        if labels_key is not None and labels_key not in keys:
            raise DataError(f"{source} has no labels array '{labels_key}' (it has {keys}); fix the name or add the labels.")
        label_key = labels_key or next((k for k in LABEL_KEYS if k in keys), None)
        data_keys = [k for k in keys if k != label_key]
        names = [s.name for s in inputs]
        if not data_keys:
            raise DataError(f"{source} holds no input arrays; add one array per model input ({', '.join(names)}).")
        mapping: dict[str, str] = {}
        if key is not None:
            if len(inputs) != 1 or key not in data_keys:
                raise DataError(f"{source} has no array '{key}' (it has {data_keys}); name the array holding the model input.")
            mapping = {names[0]: key}
        elif all(n in data_keys for n in names):
            mapping = {n: n for n in names}
        elif len(inputs) == 1 and len(data_keys) == 1:
            mapping = {names[0]: data_keys[0]}
        elif len(inputs) == 1 and "input" in data_keys:
            mapping = {names[0]: "input"}
        else:
            missing = [n for n in names if n not in data_keys]
            raise DataError(
                f"{source} has arrays {data_keys} but the model inputs are {names}; missing {missing}. "
                "Key each array by its model input name."
            )
        spill_dir: list[Path] = []

        def spill() -> Path:
            if not spill_dir:
                spill_dir.append(_spill_dir())
            return spill_dir[0]

        specs = {s.name: s for s in inputs}
        try:
            arrays = {
                name: _fit_array(_npz_member(archive, npz, key, spill), specs[name], source, key) for name, key in mapping.items()
            }
            labels = npz[label_key] if label_key else None
        except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise DataError(f"{source} could not be read ({exc}); save it again with numpy.savez.") from exc
    return _array_dataset(source, arrays, labels, inputs)


def _image_layout(spec: TensorSpec) -> tuple[str, int, int, int]:
    """(layout, channels, height, width) for an image-like model input."""
    shape = spec.shape
    if shape is None or len(shape) != 4:
        raise DataError(f"A folder of images needs a 4-D image input, but model input '{spec.describe()}' is not; use .npy/.npz data.")
    _, a, b, c = shape
    if a in (1, 3) and b is not None and c is not None:
        return "NCHW", a, b, c
    if c in (1, 3) and a is not None and b is not None:
        return "NHWC", c, a, b
    raise DataError(f"Cannot tell the image layout and size of model input '{spec.describe()}'; use .npy/.npz data instead of images.")


def _read_images(path: Path, inputs: Sequence[TensorSpec]) -> Dataset:
    if len(inputs) != 1:
        raise DataError(f"A folder of images can feed a single-input model only; this model has {len(inputs)} inputs.")
    spec = inputs[0]
    layout, channels, height, width = _image_layout(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add some or pass .npy/.npz data.")
    parents = {f.parent for f in files}
    labels = None
    if path not in parents and all(p.parent == path for p in parents):
        classes = sorted(p.name for p in parents)
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[f.parent.name] for f in files], dtype=np.int64)
    dtype = spec.dtype or np.dtype(np.float32)

    def decode(file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{file} is not a readable image ({exc}); remove it or replace it.") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        array = pixels if dtype.kind in "iu" else pixels.astype(np.float32) / 255.0
        return np.transpose(array, (2, 0, 1)) if layout == "NCHW" else array

    def take(start: int, stop: int) -> Batch:
        return {spec.name: np.ascontiguousarray(np.stack([decode(f) for f in files[start:stop]]).astype(dtype, copy=False))}

    return Dataset(str(path), len(files), take, labels)


# Reader registry: (predicate on the path, reader). First match wins.
READERS: list[tuple[Callable[[Path], bool], Callable[[Path, Sequence[TensorSpec]], Dataset]]] = [
    (lambda p: p.is_dir(), _read_images),
    (lambda p: p.suffix.lower() == ".npy", _read_npy),
    (lambda p: p.suffix.lower() == ".npz", _read_npz),
]


def open_dataset(
    path: str | Path, inputs: Sequence[TensorSpec], role: str = "data", *, key: str | None = None, labels_key: str | None = None
) -> Dataset:
    """Open calibration or validation data for a model with the given inputs.

    Args:
        path: ``.npy``, ``.npz`` or a directory of images.
        inputs: The model's graph inputs.
        role: "calibration" or "validation", used in messages.
        key: For ``.npz`` and a single-input model, the array holding the input.
        labels_key: For ``.npz``, the array holding labels (absent: no labels).

    Raises:
        DataError: Missing, unreadable, empty, or shaped/typed unlike the model inputs.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"The {role} data {p} does not exist; check the path.")
    if key is not None or labels_key is not None:
        if p.suffix.lower() != ".npz":
            raise DataError(f"The {role} data {p} must be an .npz file when array names are given.")
        dataset = _read_npz(p, inputs, key, labels_key)
        return dataset
    for matches, reader in READERS:
        if matches(p):
            dataset = reader(p, inputs)
            if len(dataset) == 0:
                raise DataError(f"The {role} data {p} is empty; provide at least one sample.")
            return dataset
    raise DataError(f"The {role} data {p} is not .npy, .npz or a folder of images; convert it to one of those.")


def random_dataset(inputs: Sequence[TensorSpec], count: int = 8, seed: int = 0) -> Dataset | None:
    """Synthetic samples for models given no data (None when an input cannot be synthesized)."""
    if not inputs:  # a model without inputs still runs (and is checked) on one empty feed
        return Dataset("random inputs", 1, lambda _start, _stop: {})
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.dtype is None or spec.shape is None:
            return None
        shape = (count, *[1 if d is None else d for d in spec.sample_shape])
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            return None
    return _array_dataset("random inputs", arrays, None, inputs)
