"""Train a small CNN that tells which bundled photo a random crop came from, on RAW RGB input.

The device feeds raw uint8 RGB crops of any size; resize, center crop and
normalization are NOT done by device code but by preprocessing that ``edgepack
build`` embeds into the model (declared in ``edgepack.yaml``). Training therefore
computes its features with :func:`edgepack.preprocess.apply_reference` and the very
same :data:`SPEC`, so training-time and serving-time features are identical.

Data: six photos that ship inside installed packages (no download):
``skimage.data`` astronaut, chelsea, coffee, rocket and scikit-learn's
``load_sample_images()`` china, flower. One class per photo.

Held-out split: every photo is cut into a 4x4 grid of tiles and the tiles in
:data:`HELDOUT_TILES` are held out. No training or calibration crop overlaps a held-out
tile; every validation crop lies entirely inside one. The crop boxes are stored in the
npz files so this can be checked (``tests/test_photos_example.py`` does).

The script is fully offline and reproducible: with the same seed on the same machine
it writes byte-identical outputs.

Outputs (in ``--out-dir``, default: this script's directory):

* ``model.onnx`` -- input ``input`` float32 [N,3,32,32] (the preprocessed crop),
  output ``logits`` float32 [N,6].
* ``calib.npz``  -- calibration crops from the training regions: ``raw`` uint8
  [n,39,52,3], ``labels`` int64, ``boxes`` int64 [n,4] (y0, x0, y1, x1 in the photo).
* ``val.npz``    -- held-out crops, same keys.
* ``labels.txt`` -- class names, one per line, in label order.

Usage::

    python examples/photos/train.py [--out-dir DIR] [--seed 0] [--epochs 3] [--per-class 3000]
"""

from __future__ import annotations

import os

# Multi-threaded BLAS may change the summation order between runs, which would
# break byte-for-byte reproducibility. The model is small, so one thread is fine.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgepack.preprocess import ImagePreprocess, apply_reference  # noqa: E402

OPSET = 17
IR_VERSION = 8

#: Class names in label order; the photo each name refers to is loaded by :func:`load_photos`.
CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
NUM_CLASSES = len(CLASSES)

#: The preprocessing declared in ``edgepack.yaml`` (``input.image``); the test checks both agree.
SPEC = ImagePreprocess(
    color="rgb", model_color="rgb",
    min_size=(32, 32), max_size=(1024, 1024),
    resize_shorter=36, center_crop=(32, 32),
    scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    layout="NCHW",
)
INPUT_HW = SPEC.center_crop

#: (height, width) of every raw crop in calib.npz / val.npz, like a small 4:3 camera
#: frame. Non-square, so the embedded resize_shorter (39x52 -> 36x48) and the center
#: crop (-> 32x32, offset (2, 8)) both do work. Small, to keep the committed files small.
RAW_SIZE = (39, 52)
#: Height range (photo pixels) of the region a calib/val frame shows; the frame is a
#: PIL bilinear downscale of the region to RAW_SIZE.
REGION_HEIGHT = (48, 120)
GRID = 4
#: (row, col) tiles of the GRID x GRID split held out of training. Both are interior
#: tiles, surrounded by training area: validation asks "which scene is this unseen
#: patch from", not "what does a corner never shown look like" (a split with a corner
#: tile, (3, 0), scored ~0.87 because e.g. coffee's bottom-left wood is unlike the rest).
HELDOUT_TILES = ((1, 2), (2, 1))
#: Side lengths (pixels in the photo) of training crops; height and width are drawn
#: independently, so aspects vary from 1:3 to 3:1.
TRAIN_SIDE = (40, 120)
#: Range of the random brightness gain applied to training crops.
BRIGHTNESS = (0.75, 1.25)
CALIB_PER_CLASS = 17
VAL_PER_CLASS = 33

# Independent random streams: the same seed never feeds two purposes.
_STREAM_TRAIN, _STREAM_CALIB, _STREAM_VAL, _STREAM_MODEL = 0, 1, 2, 3

CONV1_CH = 16
CONV2_CH = 32
HIDDEN = 64


# --------------------------------------------------------------------------- photos and crops


def load_photos() -> list[np.ndarray]:
    """The six photos as uint8 [H, W, 3], in :data:`CLASSES` order (offline, no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    sample = dict(zip((Path(f).stem for f in bunch.filenames), bunch.images))
    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "china": sample["china"], "flower": sample["flower"]}
    out = [np.ascontiguousarray(photos[name], dtype=np.uint8) for name in CLASSES]
    assert all(p.ndim == 3 and p.shape[2] == 3 for p in out)
    return out


def tile_box(shape: tuple[int, ...], row: int, col: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of grid tile (row, col) in a photo of ``shape``; half-open."""
    h, w = shape[0], shape[1]
    return (row * h // GRID, col * w // GRID, (row + 1) * h // GRID, (col + 1) * w // GRID)


def heldout_boxes(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """The held-out tiles of a photo of ``shape``."""
    return [tile_box(shape, r, c) for r, c in HELDOUT_TILES]


def overlaps(a, b) -> bool:
    """Whether two half-open (y0, x0, y1, x1) boxes share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(box, outer) -> bool:
    """Whether ``box`` lies entirely inside ``outer``."""
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


def sample_train_box(rng: np.random.Generator, shape: tuple[int, ...],
                     aspect: float | None = None, side: tuple[int, int] = TRAIN_SIDE) -> tuple[int, int, int, int]:
    """A random box in the training region (overlapping no held-out tile).

    Args:
        rng: Random stream.
        shape: Photo shape.
        aspect: Fixed width / height, or None for a random aspect (sides in ``side``).
        side: Smallest and largest side length.
    """
    h_img, w_img = shape[0], shape[1]
    held = heldout_boxes(shape)
    while True:
        if aspect is None:
            h = int(rng.integers(side[0], side[1] + 1))
            w = int(rng.integers(side[0], side[1] + 1))
        else:
            h = int(rng.integers(side[0], side[1] + 1))
            w = int(round(h * aspect))
        h, w = min(h, h_img), min(w, w_img)
        y0 = int(rng.integers(0, h_img - h + 1))
        x0 = int(rng.integers(0, w_img - w + 1))
        box = (y0, x0, y0 + h, x0 + w)
        if not any(overlaps(box, t) for t in held):
            return box


def sample_heldout_box(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A random :data:`RAW_SIZE`-aspect box entirely inside one held-out tile."""
    tile = heldout_boxes(shape)[int(rng.integers(len(HELDOUT_TILES)))]
    th, tw = tile[2] - tile[0], tile[3] - tile[1]
    rh, rw = RAW_SIZE
    h_max = min(th, tw * rh // rw, REGION_HEIGHT[1])
    h = int(rng.integers(REGION_HEIGHT[0], h_max + 1))
    w = h * rw // rh
    y0 = tile[0] + int(rng.integers(0, th - h + 1))
    x0 = tile[1] + int(rng.integers(0, tw - w + 1))
    return (y0, x0, y0 + h, x0 + w)


def render(photo: np.ndarray, box, size: tuple[int, int] | None = None) -> np.ndarray:
    """Cut ``box`` out of ``photo``; resize it to ``size`` (h, w) with PIL bilinear if given.

    This plays the camera: it delivers a frame of a fixed size. The model-side
    resize/crop/normalize is the embedded preprocessing, not this.
    """
    crop = photo[box[0]:box[2], box[1]:box[3]]
    if size is None or crop.shape[:2] == tuple(size):
        return np.ascontiguousarray(crop)
    from PIL import Image

    return np.asarray(Image.fromarray(crop).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


def fixed_size_set(photos: list[np.ndarray], per_class: int, seed: int, heldout: bool):
    """Crops of :data:`RAW_SIZE` for calib.npz (training region) or val.npz (held out).

    Returns:
        ``(raw uint8 [n, 39, 52, 3], labels int64 [n], boxes int64 [n, 4])``.
    """
    stream = _STREAM_VAL if heldout else _STREAM_CALIB
    rng = np.random.default_rng([seed, stream])
    raw, labels, boxes = [], [], []
    aspect = RAW_SIZE[1] / RAW_SIZE[0]
    for label, photo in enumerate(photos):
        for _ in range(per_class):
            if heldout:
                box = sample_heldout_box(rng, photo.shape)
            else:
                box = sample_train_box(rng, photo.shape, aspect=aspect, side=REGION_HEIGHT)
            raw.append(render(photo, box, RAW_SIZE))
            labels.append(label)
            boxes.append(box)
    return (np.stack(raw), np.asarray(labels, dtype=np.int64), np.asarray(boxes, dtype=np.int64))


def augmented_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One raw training crop: random box, sometimes downscaled (a fixed-size camera), flip, brightness."""
    box = sample_train_box(rng, photo.shape)
    crop = render(photo, box)
    if rng.random() < 0.5:
        # Downscale so the shorter side is 36..64 px, like a low-resolution camera frame.
        short = min(crop.shape[:2])
        target = int(rng.integers(36, min(short, 64) + 1))
        size = (max(crop.shape[0] * target // short, 32), max(crop.shape[1] * target // short, 32))
        crop = render(crop, (0, 0, crop.shape[0], crop.shape[1]), size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(*BRIGHTNESS)
    return np.clip(np.rint(crop.astype(np.float32) * np.float32(gain)), 0, 255).astype(np.uint8)


def to_input(raw: np.ndarray) -> np.ndarray:
    """Model input float32 [n, 3, 32, 32] from raw uint8 crops [n, H, W, 3]: exactly what
    the embedded preprocessing computes on the device."""
    return apply_reference(SPEC, raw)


def training_set(photos: list[np.ndarray], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Augmented training inputs (already preprocessed through :data:`SPEC`) and labels."""
    rng = np.random.default_rng([seed, _STREAM_TRAIN])
    x = np.empty((len(photos) * per_class, SPEC.model_channels, *INPUT_HW), dtype=np.float32)
    for label, photo in enumerate(photos):
        for i in range(label * per_class, (label + 1) * per_class):
            x[i] = apply_reference(SPEC, augmented_crop(photo, rng)[None])[0]
    return x, np.repeat(np.arange(len(photos), dtype=np.int64), per_class)


# --------------------------------------------------------------------------- layers
#
# Activations are channels-last (NHWC) inside the trainer: the im2col columns and the
# matmul outputs are then contiguous, which is ~2x faster in numpy than NCHW. Weights
# are kept in ONNX layout ([O, C, 3, 3], [out, in]) and the input/Flatten are
# transposed at the edges, so the exported NCHW graph computes the same function.


def im2col3x3(x: np.ndarray) -> np.ndarray:
    """Unfold 3x3 / stride 1 / pad 1 patches of NHWC [B, H, W, C] into [B*H*W, 9*C], order (kh, kw, c)."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1).reshape(b * h * w, 9 * c)


def col2im3x3(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`im2col3x3`: scatter-add patch gradients back."""
    b, h, w, c = shape
    d = dcols.reshape(b, h, w, 9, c)
    dxp = np.zeros((b, h + 2, w + 2, c), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, i:i + h, j:j + w, :] += d[:, :, :, 3 * i + j, :]
    return dxp[:, 1:-1, 1:-1, :]


def _weight_matrix(w: np.ndarray) -> np.ndarray:
    """ONNX Conv weight [O, C, 3, 3] as [O, 9*C] in im2col order (kh, kw, c)."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """3x3 same-padding convolution of NHWC ``x`` via im2col; returns (out NHWC, cache)."""
    n, h, wd, _ = x.shape
    cols = im2col3x3(x)
    out = cols @ _weight_matrix(w).T + b
    return out.reshape(n, h, wd, -1), (cols, x.shape)


def conv_backward(dout: np.ndarray, w: np.ndarray, cache, need_dx: bool = True):
    """Gradients of :func:`conv_forward`; returns (dx or None, dw, db)."""
    cols, xshape = cache
    d2 = dout.reshape(-1, w.shape[0])
    o, c = w.shape[0], w.shape[1]
    dw = (d2.T @ cols).reshape(o, 3, 3, c).transpose(0, 3, 1, 2)
    db = d2.sum(axis=0)
    dx = col2im3x3(d2 @ _weight_matrix(w), xshape) if need_dx else None
    return dx, dw, db


def maxpool_forward(x: np.ndarray, k: int):
    """k x k / stride k max pooling of NHWC ``x``; returns (out, cache)."""
    b, h, w, c = x.shape
    windows = x.reshape(b, h // k, k, w // k, k, c)
    out = windows.max(axis=(2, 4))
    return out, (windows, out, k)


def maxpool_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Gradient of :func:`maxpool_forward`, sent to every maximum of a window.

    Ties only happen between ReLU zeros in practice, and the ReLU gradient that
    follows removes those, so this equals routing to a single winner.
    """
    windows, out, k = cache
    b, hk, _, wk, _, c = windows.shape
    mask = windows == out[:, :, None, :, None, :]
    return (mask * dout[:, :, None, :, None, :]).reshape(b, hk * k, wk * k, c)


# --------------------------------------------------------------------------- model


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-normal weights, zero biases, all float32, in ONNX layout."""
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    flat = CONV2_CH
    return {
        "conv1.weight": he((CONV1_CH, 3, 3, 3), 27),
        "conv1.bias": np.zeros(CONV1_CH, np.float32),
        "conv2.weight": he((CONV2_CH, CONV1_CH, 3, 3), CONV1_CH * 9),
        "conv2.bias": np.zeros(CONV2_CH, np.float32),
        "fc1.weight": he((HIDDEN, flat), flat),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": he((NUM_CLASSES, HIDDEN), HIDDEN),
        "fc2.bias": np.zeros(NUM_CLASSES, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray):
    """Run the network on NCHW model inputs (same function as :func:`build_onnx`); returns (logits, cache)."""
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    z1, c1 = conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    a1, cp1 = maxpool_forward(np.maximum(z1, 0), 2)
    z2, c2 = conv_forward(a1, p["conv2.weight"], p["conv2.bias"])
    # The second pool is global (GlobalMaxPool over the 16x16 map): a crop is classified
    # by what it contains, not where, and the first Gemm stays tiny.
    a2, cp2 = maxpool_forward(np.maximum(z2, 0), z2.shape[1])
    flat = a2.reshape(len(x), -1)  # [B, C], as ONNX Flatten of the [B, C, 1, 1] pool
    z3 = flat @ p["fc1.weight"].T + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"].T + p["fc2.bias"]
    return logits, (c1, z1, cp1, c2, z2, cp2, a2.shape, flat, z3, a3)


def backward(p: dict[str, np.ndarray], dlogits: np.ndarray, cache) -> dict[str, np.ndarray]:
    """Backpropagate ``dlogits`` through :func:`forward`."""
    c1, z1, cp1, c2, z2, cp2, pshape, flat, z3, a3 = cache
    g = {"fc2.weight": dlogits.T @ a3, "fc2.bias": dlogits.sum(0)}
    dz3 = (dlogits @ p["fc2.weight"]) * (z3 > 0)
    g["fc1.weight"] = dz3.T @ flat
    g["fc1.bias"] = dz3.sum(0)
    dz2 = maxpool_backward((dz3 @ p["fc1.weight"]).reshape(pshape), cp2) * (z2 > 0)
    da1, g["conv2.weight"], g["conv2.bias"] = conv_backward(dz2, p["conv2.weight"], c2)
    dz1 = maxpool_backward(da1, cp1) * (z1 > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv_backward(dz1, p["conv1.weight"], c1, need_dx=False)
    return g


def softmax_xent_grad(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy loss and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = float(-np.log(prob[np.arange(n), labels] + 1e-12).mean())
    prob[np.arange(n), labels] -= 1.0
    return loss, (prob / n).astype(np.float32)


class Adam:
    """Plain Adam with decoupled weight decay on weight matrices only."""

    def __init__(self, params: dict[str, np.ndarray], lr: float,
                 wd: float = 1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, wd, b1, b2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update ``params`` in place."""
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            upd = self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)
            if k.endswith("weight"):
                upd = upd + self.lr * self.wd * params[k]
            params[k] -= upd.astype(np.float32)


def predict(p: dict[str, np.ndarray], x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class predictions for model inputs ``x`` [n, 3, 32, 32]."""
    return np.concatenate([forward(p, x[i:i + batch])[0].argmax(1) for i in range(0, len(x), batch)])


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int = 64,
          lr: float = 2e-3) -> dict[str, np.ndarray]:
    """Adam on mini-batches with cosine learning-rate decay; random flips each epoch."""
    rng = np.random.default_rng([seed, _STREAM_MODEL])
    params = init_params(rng)
    opt = Adam(params, lr)
    steps_per_epoch = -(-len(x) // batch)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        flip = rng.random(len(x)) < 0.5
        losses = []
        for s in range(steps_per_epoch):
            opt.lr = float(lr * 0.5 * (1 + np.cos(np.pi * opt.t / total)))
            step = slice(s * batch, (s + 1) * batch)
            xb, yb = x[order[step]], y[order[step]]  # copies, so flipping leaves x intact
            xb[flip[step]] = xb[flip[step], :, :, ::-1]
            logits, cache = forward(params, xb)
            loss, dlogits = softmax_xent_grad(logits, yb)
            opt.step(params, backward(params, dlogits, cache))
            losses.append(loss)
        print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}", flush=True)
    return params


# --------------------------------------------------------------------------- export


def build_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Build the ONNX graph with fixed names so the bytes are reproducible."""
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"],
                         name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalMaxPool", ["relu2"], ["pool2"], name="pool2"),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, np.float32), name=k) for k, v in p.items()]
    graph = helper.make_graph(
        nodes, "photos_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *INPUT_HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits,
    )
    # Pin producer fields so the file does not depend on the installed onnx version.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgepack-examples-photos", producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = ("Which of six photos a crop came from. Input = SPEC-preprocessed RGB crop "
                        "(resize_shorter 36, center crop 32, ImageNet mean/std, NCHW); output = logits.")
    onnx.checker.check_model(model, full_check=True)
    return model


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed .npz with fixed zip timestamps (``np.savez_compressed`` stamps the clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, arr.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    path.write_bytes(buf.getvalue())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write model.onnx, calib.npz, val.npz, labels.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=3000, help="training crops per photo")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the data, train, evaluate, export; returns a process exit code."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    photos = load_photos()
    x, y = training_set(photos, args.per_class, args.seed)
    calib_raw, calib_labels, calib_boxes = fixed_size_set(photos, CALIB_PER_CLASS, args.seed, heldout=False)
    val_raw, val_labels, val_boxes = fixed_size_set(photos, VAL_PER_CLASS, args.seed, heldout=True)
    print(f"data           {time.perf_counter() - t0:.1f} s ({len(x)} training crops)", flush=True)

    t1 = time.perf_counter()
    params = train(x, y, args.seed, args.epochs)
    elapsed = time.perf_counter() - t1

    train_acc = float((predict(params, x) == y).mean())
    calib_acc = float((predict(params, to_input(calib_raw)) == calib_labels).mean())
    val_acc = float((predict(params, to_input(val_raw)) == val_labels).mean())
    print(f"train accuracy {train_acc:.4f} (n={len(y)})")
    print(f"calib accuracy {calib_acc:.4f} (n={len(calib_labels)}, training regions)")
    print(f"val accuracy   {val_acc:.4f} (n={len(val_labels)}, held-out tiles)")
    print(f"training time  {elapsed:.1f} s (total {time.perf_counter() - t0:.1f} s)")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(build_onnx(params).SerializeToString())
    save_npz(out / "calib.npz", raw=calib_raw, labels=calib_labels, boxes=calib_boxes)
    save_npz(out / "val.npz", raw=val_raw, labels=val_labels, boxes=val_boxes)
    (out / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES), encoding="utf-8")
    print(f"wrote {out / 'model.onnx'}, calib.npz ({len(calib_labels)}), val.npz ({len(val_labels)}), labels.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
