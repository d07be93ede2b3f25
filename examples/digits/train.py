"""Train a small CNN on scikit-learn's bundled digits and export it to ONNX.

The script is fully offline (``load_digits`` ships its data) and reproducible:
with the same seed on the same machine it writes byte-identical outputs.

Outputs (in ``--out-dir``, default: this script's directory):

* ``model.onnx``  -- input ``input`` float32 [N,1,8,8] (pixel/16), output
  ``logits`` float32 [N,10].
* ``val.npz``     -- held-out labelled test split: ``input``, ``labels``,
  ``raw``, ``indices``.
* ``calib.npz``   -- calibration subset drawn from the training split:
  ``input``, ``raw``, ``indices``.

Usage::

    python examples/digits/train.py [--out-dir DIR] [--seed 0] [--epochs 30]
"""

from __future__ import annotations

import os

# Multi-threaded BLAS may change the summation order between runs, which would
# break byte-for-byte reproducibility. The model is tiny, so one thread is fine.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 10
PIXEL_MAX = 16.0
CONV1_CH = 16
CONV2_CH = 32
HIDDEN = 64


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Splits:
    """Index arrays into the original ``load_digits`` dataset."""

    train: np.ndarray
    val: np.ndarray
    calib: np.ndarray


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled digits.

    Returns:
        ``(raw, labels)``: uint8 [1797, 8, 8] pixel values in 0..16 and int64 labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = digits.images.astype(np.uint8)
    return raw, digits.target.astype(np.int64)


def make_splits(labels: np.ndarray, seed: int, val_frac: float = 0.25,
                calib_size: int = 200) -> Splits:
    """Stratified train/val split, plus a calibration subset of train.

    Args:
        labels: Class label per sample.
        seed: Seed for the shuffles.
        val_frac: Fraction of the dataset held out for validation.
        calib_size: Number of training samples used for calibration.

    Returns:
        Sorted index arrays; ``calib`` is a subset of ``train``.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels), dtype=np.int64)
    train, val = train_test_split(idx, test_size=val_frac, stratify=labels,
                                  random_state=seed)
    # Calibration data must never come from the held-out split, otherwise
    # quantization would be tuned on the data it is evaluated on.
    calib, _ = train_test_split(train, train_size=calib_size,
                                stratify=labels[train], random_state=seed + 1)
    return Splits(np.sort(train), np.sort(val), np.sort(calib))


def to_input(raw: np.ndarray) -> np.ndarray:
    """Convert raw 0..16 pixels [n,8,8] into model input float32 [n,1,8,8]."""
    return (raw.astype(np.float32) / np.float32(PIXEL_MAX))[:, None, :, :]


# --------------------------------------------------------------------------- layers


def im2col3x3(x: np.ndarray) -> np.ndarray:
    """Unfold 3x3 / stride 1 / pad 1 patches.

    Args:
        x: [B, C, H, W].

    Returns:
        [B*H*W, C*9], column order (c, kh, kw) to match an ONNX Conv weight
        [O, C, 3, 3] reshaped to [O, C*9].
    """
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    taps = [xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    cols = np.stack(taps, axis=2)  # [B, C, 9, H, W]
    return cols.transpose(0, 3, 4, 1, 2).reshape(b * h * w, c * 9)


def col2im3x3(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`im2col3x3`: scatter-add patch gradients back."""
    b, c, h, w = shape
    d = dcols.reshape(b, h, w, c, 3, 3).transpose(0, 3, 4, 5, 1, 2)
    dxp = np.zeros((b, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, i, j]
    return dxp[:, :, 1:-1, 1:-1]


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """3x3 same-padding convolution via im2col; returns (out, cache)."""
    n, _, h, wd = x.shape
    cols = im2col3x3(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    out = out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)
    return out, (cols, x.shape)


def conv_backward(dout: np.ndarray, w: np.ndarray, cache):
    """Gradients of :func:`conv_forward`; returns (dx, dw, db)."""
    cols, xshape = cache
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0)
    dx = col2im3x3(d2 @ w.reshape(w.shape[0], -1), xshape)
    return dx, dw, db


def maxpool_forward(x: np.ndarray):
    """2x2 / stride 2 max pooling; returns (out, cache)."""
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h // 2, 2, w // 2, 2)
    out = xr.max(axis=(3, 5))
    # Route the gradient to one winner per window, even when ReLU produced ties.
    flat = xr.transpose(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
    winner = flat.argmax(axis=-1)
    return out, (winner, x.shape)


def maxpool_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Gradient of :func:`maxpool_forward`."""
    winner, (b, c, h, w) = cache
    onehot = np.eye(4, dtype=dout.dtype)[winner] * dout[..., None]
    d = onehot.reshape(b, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return d.reshape(b, c, h, w)


# --------------------------------------------------------------------------- model


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-normal weights, zero biases, all float32."""
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    flat = CONV2_CH * 4 * 4
    return {
        "conv1.weight": he((CONV1_CH, 1, 3, 3), 9),
        "conv1.bias": np.zeros(CONV1_CH, np.float32),
        "conv2.weight": he((CONV2_CH, CONV1_CH, 3, 3), CONV1_CH * 9),
        "conv2.bias": np.zeros(CONV2_CH, np.float32),
        "fc1.weight": he((HIDDEN, flat), flat),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": he((NUM_CLASSES, HIDDEN), HIDDEN),
        "fc2.bias": np.zeros(NUM_CLASSES, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray):
    """Run the network; returns (logits, cache for :func:`backward`)."""
    z1, c1 = conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    a1 = np.maximum(z1, 0)
    z2, c2 = conv_forward(a1, p["conv2.weight"], p["conv2.bias"])
    a2 = np.maximum(z2, 0)
    pooled, cp = maxpool_forward(a2)
    flat = pooled.reshape(len(x), -1)  # NCHW order, same as ONNX Flatten
    z3 = flat @ p["fc1.weight"].T + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"].T + p["fc2.bias"]
    return logits, (c1, z1, c2, z2, cp, pooled.shape, flat, z3, a3)


def backward(p: dict[str, np.ndarray], dlogits: np.ndarray, cache) -> dict[str, np.ndarray]:
    """Backpropagate ``dlogits`` through :func:`forward`."""
    c1, z1, c2, z2, cp, pshape, flat, z3, a3 = cache
    g = {"fc2.weight": dlogits.T @ a3, "fc2.bias": dlogits.sum(0)}
    dz3 = (dlogits @ p["fc2.weight"]) * (z3 > 0)
    g["fc1.weight"] = dz3.T @ flat
    g["fc1.bias"] = dz3.sum(0)
    dpool = (dz3 @ p["fc1.weight"]).reshape(pshape)
    dz2 = maxpool_backward(dpool, cp) * (z2 > 0)
    da1, g["conv2.weight"], g["conv2.bias"] = conv_backward(dz2, p["conv2.weight"], c2)
    dz1 = da1 * (z1 > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv_backward(dz1, p["conv1.weight"], c1)
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
    """Class predictions for ``x`` [n,1,8,8]."""
    out = [forward(p, x[i:i + batch])[0].argmax(1) for i in range(0, len(x), batch)]
    return np.concatenate(out)


def random_shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by up to one pixel; digits are not perfectly centred."""
    out = np.zeros_like(x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dy, dx = rng.integers(0, 3, size=(2, len(x)))
    for k in range(len(x)):
        out[k] = xp[k, :, dy[k]:dy[k] + 8, dx[k]:dx[k] + 8]
    return out


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int = 32,
          lr: float = 2e-3) -> dict[str, np.ndarray]:
    """Train with Adam on mini-batches with a cosine learning-rate decay.

    Args:
        x: Training inputs [n,1,8,8] float32.
        y: Training labels [n] int64.
        seed: Seed for init, shuffling and augmentation.
        epochs: Number of passes over ``x``.
        batch: Mini-batch size.
        lr: Peak learning rate.

    Returns:
        Trained parameters.
    """
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    opt = Adam(params, lr)
    steps_per_epoch = -(-len(x) // batch)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        xs = random_shift(x[order], rng)
        ys = y[order]
        losses = []
        for s in range(steps_per_epoch):
            opt.lr = float(lr * 0.5 * (1 + np.cos(np.pi * opt.t / total)))
            xb, yb = xs[s * batch:(s + 1) * batch], ys[s * batch:(s + 1) * batch]
            logits, cache = forward(params, xb)
            loss, dlogits = softmax_xent_grad(logits, yb)
            opt.step(params, backward(params, dlogits, cache))
            losses.append(loss)
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}")
    return params


# --------------------------------------------------------------------------- export


def build_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Build the ONNX graph with fixed names so the bytes are reproducible."""
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"],
                         name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2.weight", "conv2.bias"], ["conv2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], name="pool",
                         kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"],
                         name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"],
                         name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, np.float32), name=k)
             for k, v in p.items()]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits,
    )
    # Pin producer fields: onnx.helper would otherwise leave them empty, and a
    # fixed value keeps the file independent of the installed onnx version.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgepack-examples-digits",
                              producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = "Small CNN on sklearn digits; input = pixel/16, output = logits."
    onnx.checker.check_model(model, full_check=True)
    return model


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed .npz with fixed zip timestamps.

    ``np.savez_compressed`` stamps the current time into each zip entry, so the
    committed files would change on every regeneration.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            zf.writestr(info, arr.getvalue())
    path.write_bytes(buf.getvalue())


def accuracy(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((predict(p, x) == y).mean())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write model.onnx, val.npz, calib.npz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, export; returns a process exit code."""
    args = parse_args(argv)
    raw, labels = load_data()
    splits = make_splits(labels, args.seed)
    x = to_input(raw)

    t0 = time.perf_counter()
    params = train(x[splits.train], labels[splits.train], args.seed, args.epochs)
    elapsed = time.perf_counter() - t0

    train_acc = accuracy(params, x[splits.train], labels[splits.train])
    val_acc = accuracy(params, x[splits.val], labels[splits.val])
    print(f"train accuracy {train_acc:.4f} (n={len(splits.train)})")
    print(f"val accuracy   {val_acc:.4f} (n={len(splits.val)})")
    print(f"training time  {elapsed:.1f} s")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(build_onnx(params).SerializeToString())
    save_npz(out / "val.npz", input=x[splits.val], labels=labels[splits.val],
             raw=raw[splits.val][..., None], indices=splits.val)
    save_npz(out / "calib.npz", input=x[splits.calib], raw=raw[splits.calib][..., None],
             indices=splits.calib)
    print(f"wrote {out / 'model.onnx'}, val.npz ({len(splits.val)}), "
          f"calib.npz ({len(splits.calib)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
