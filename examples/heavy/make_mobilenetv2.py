"""Generate a MobileNetV2-shaped ONNX model with random (seeded) weights.

The graph follows the real MobileNetV2 architecture (Sandler et al. 2018, as in
torchvision): a 3x3 stride-2 stem, 17 inverted residual blocks, a 1x1 conv to
1280 channels, global average pooling and a 1000-way Gemm. Every conv is
followed by its own ``BatchNormalization`` node and ReLU6 is expressed as
``Clip(0, 6)``, so graph optimizers have Conv+BN(+Clip) patterns to fuse.

Weights are random, so the model is only useful for latency and size work,
never for accuracy. To keep activations in a sane range, each BN's running
mean/variance are set from the statistics of its conv output on a couple of
seeded synthetic images (computed with a small numpy forward pass), and its
scale/bias are drawn at random around (1, 0).

Usage::

    python examples/heavy/make_mobilenetv2.py -o mnv2.onnx \\
        [--calib calib.npz --calib-samples 64] [--val val.npz --val-samples 64]
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BN_EPS = 1e-5
LAST_CHANNEL = 1280
# (expansion t, output channels c, repeats n, first stride s), from the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Purpose tags mixed into the seed so the BN-calibration images, the calib set
# and the val set are independent streams even for the same user seed.
_STREAM_WEIGHTS, _STREAM_BN, _STREAM_CALIB, _STREAM_VAL = 0, 1, 2, 3
_BN_CALIB_IMAGES = 2


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channel counts like torchvision so width multipliers stay SIMD-friendly.

    Args:
        v: Unrounded channel count.
        divisor: Required multiple.

    Returns:
        ``v`` rounded to a multiple of ``divisor``, never more than 10% below ``v``.
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# --------------------------------------------------------------------------- data


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """Linear-interpolation matrix [dst, src] used to upsample noise grids."""
    pos = np.linspace(0.0, src - 1, dst)
    lo = np.minimum(np.floor(pos).astype(int), src - 2)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] = 1.0 - frac
    m[np.arange(dst), lo + 1] += frac
    return m


def smooth_images(n: int, resolution: int = 224, seed: int = 0,
                  stream: int = _STREAM_CALIB) -> np.ndarray:
    """Deterministic pseudo-natural images: multi-octave smooth random fields.

    White noise has no spatial structure and drives conv nets into atypical
    regimes; summed upsampled noise octaves look more like photos (mostly
    low-frequency content, correlated colour channels).

    Args:
        n: Number of images.
        resolution: Height and width.
        seed: User seed.
        stream: Purpose tag so different uses get independent images.

    Returns:
        float32 [n, 3, resolution, resolution], ImageNet mean/std normalised.
    """
    rng = np.random.default_rng([seed, stream])
    octaves = [s for s in (4, 8, 16, 32, 64) if s <= resolution]
    mats = {s: _interp_matrix(s, resolution) for s in octaves}
    out = np.empty((n, 3, resolution, resolution), dtype=np.float32)
    for k in range(n):
        field = np.zeros((3, resolution, resolution))
        for s in octaves:
            shared = rng.standard_normal((1, s, s))
            colour = rng.standard_normal((3, s, s))
            noise = (shared + 0.5 * colour) * (4.0 / s) ** 0.7
            field += mats[s] @ noise @ mats[s].T
        field = (field - field.min()) / (field.max() - field.min() + 1e-12)
        out[k] = (field.astype(np.float32) - IMAGENET_MEAN[:, None, None]) \
            / IMAGENET_STD[:, None, None]
    return out


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed .npz with fixed zip timestamps (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------- numpy reference ops
# Only used to derive BN statistics while building; they mirror the ONNX ops.


def _conv_np(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Bias-free convolution for the three kinds MobileNetV2 uses.

    Args:
        x: [N, C, H, W] input.
        w: [O, C/groups, k, k] weight, k in {1, 3}; 3x3 convs use pad 1.
        stride: 1 or 2.
        groups: 1, or C for depthwise.

    Returns:
        [N, O, H', W'] output.
    """
    k = w.shape[-1]
    if k == 1:
        return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x, optimize=True)
    n, c, h, wd = x.shape
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], ho, wo), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            tap = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            if groups == 1:
                out += np.einsum("oc,nchw->nohw", w[:, :, i, j], tap, optimize=True)
            else:
                out += w[None, :, 0, i, j, None, None] * tap
    return out


def _bn_np(x: np.ndarray, scale, bias, mean, var) -> np.ndarray:
    """Inference-mode batch norm, same formula as the ONNX op."""
    inv = scale / np.sqrt(var + BN_EPS)
    return ((x - mean[:, None, None]) * inv[:, None, None] + bias[:, None, None]).astype(np.float32)


# --------------------------------------------------------------------------- graph builder


class _Builder:
    """Accumulates ONNX nodes/initializers while tracking a numpy activation.

    Attributes:
        nodes: ONNX nodes in topological order.
        inits: Initializer tensors.
        rng: Weight RNG.
        probe: Current activation of the BN-calibration images, same tensor as
            the last emitted ONNX value.
    """

    def __init__(self, rng: np.random.Generator, probe: np.ndarray):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = rng
        self.probe = probe
        self._add_init("relu6.min", np.array(0.0, np.float32))
        self._add_init("relu6.max", np.array(6.0, np.float32))

    def _add_init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name=name))
        return name

    def _node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def _bn_params(self, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Random scale/bias, running stats matched to the observed conv output.

        Stats are rounded to float16 precision so that last-bit differences in
        the numpy forward pass (BLAS kernels differ across CPUs) rarely change
        the stored bytes.
        """
        ch = y.shape[1]
        mean = y.mean(axis=(0, 2, 3))
        var = np.maximum(y.var(axis=(0, 2, 3)), 1e-3)
        mean = mean.astype(np.float16).astype(np.float32)
        var = var.astype(np.float16).astype(np.float32)
        scale = self.rng.uniform(0.5, 1.5, ch).astype(np.float32)
        bias = self.rng.uniform(-0.5, 0.5, ch).astype(np.float32)
        return scale, bias, mean, var

    def conv_bn(self, x: str, name: str, out_ch: int, kernel: int, stride: int = 1,
                depthwise: bool = False, relu6: bool = True) -> str:
        """Emit Conv (no bias) -> BatchNormalization [-> Clip(0, 6)].

        Args:
            x: Input value name.
            name: Prefix for node/initializer names.
            out_ch: Output channels (must equal input channels if depthwise).
            kernel: 1 or 3.
            stride: 1 or 2.
            depthwise: Use group = channels.
            relu6: Append ReLU6; projection convs stay linear.

        Returns:
            Name of the block's output value.
        """
        in_ch = self.probe.shape[1]
        groups = in_ch if depthwise else 1
        fan_out = out_ch * kernel * kernel // groups  # torchvision's kaiming mode
        w = (self.rng.standard_normal((out_ch, in_ch // groups, kernel, kernel))
             * np.sqrt(2.0 / fan_out)).astype(np.float32)
        pad = kernel // 2
        y = self._node("Conv", [x, self._add_init(f"{name}.weight", w)], f"{name}.conv",
                       kernel_shape=[kernel, kernel], strides=[stride, stride],
                       pads=[pad] * 4, group=groups)
        self.probe = _conv_np(self.probe, w, stride, groups)

        params = self._bn_params(self.probe)
        bn_inputs = [y] + [self._add_init(f"{name}.bn.{p}", a)
                           for p, a in zip(("scale", "bias", "mean", "var"), params)]
        y = self._node("BatchNormalization", bn_inputs, f"{name}.bn", epsilon=BN_EPS)
        self.probe = _bn_np(self.probe, *params)
        if relu6:
            y = self._node("Clip", [y, "relu6.min", "relu6.max"], f"{name}.relu6")
            self.probe = np.clip(self.probe, 0.0, 6.0)
        return y

    def inverted_residual(self, x: str, name: str, out_ch: int, stride: int,
                          expand: int) -> str:
        """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1) [+ skip]."""
        in_ch = self.probe.shape[1]
        skip, skip_probe = x, self.probe
        if expand != 1:
            x = self.conv_bn(x, f"{name}.expand", in_ch * expand, 1)
        x = self.conv_bn(x, f"{name}.dw", in_ch * expand, 3, stride, depthwise=True)
        x = self.conv_bn(x, f"{name}.project", out_ch, 1, relu6=False)
        if stride == 1 and in_ch == out_ch:
            x = self._node("Add", [skip, x], f"{name}.add")
            self.probe = self.probe + skip_probe
        return x

    def classifier(self, x: str, num_classes: int) -> str:
        """GlobalAveragePool -> Flatten -> Gemm producing ``logits``."""
        feat = self.probe.shape[1]
        x = self._node("GlobalAveragePool", [x], "pool")
        x = self._node("Flatten", [x], "flatten", axis=1)
        # Unit-variance-preserving init so logits spread rather than collapse.
        w = (self.rng.standard_normal((num_classes, feat)) / np.sqrt(feat)).astype(np.float32)
        b = np.zeros(num_classes, np.float32)
        self.nodes.append(helper.make_node(
            "Gemm", [x, self._add_init("classifier.weight", w),
                     self._add_init("classifier.bias", b)],
            ["logits"], name="classifier", transB=1))
        self.probe = self.probe.mean(axis=(2, 3)) @ w.T + b
        return "logits"


def build_mobilenetv2(seed: int = 0, resolution: int = 224, num_classes: int = 1000,
                      width_mult: float = 1.0) -> onnx.ModelProto:
    """Build a randomly initialised MobileNetV2 as an ONNX model.

    Args:
        seed: Seed for weights and the BN-calibration images; same seed gives
            byte-identical models.
        resolution: Input height/width (input is [1, 3, resolution, resolution]).
        num_classes: Size of the ``logits`` output.
        width_mult: Channel multiplier, as in the paper.

    Returns:
        A checked ONNX model (opset 17, IR version 8).
    """
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 (five stride-2 stages), got {resolution}")
    b = _Builder(np.random.default_rng([seed, _STREAM_WEIGHTS]),
                 smooth_images(_BN_CALIB_IMAGES, resolution, seed, _STREAM_BN))
    x = b.conv_bn("input", "stem", make_divisible(32 * width_mult), 3, stride=2)
    idx = 0
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        out_ch = make_divisible(c * width_mult)
        for i in range(n):
            x = b.inverted_residual(x, f"block{idx}", out_ch, s if i == 0 else 1, t)
            idx += 1
    x = b.conv_bn(x, "head", make_divisible(LAST_CHANNEL * max(1.0, width_mult)), 1)
    b.classifier(x, num_classes)
    if not np.all(np.isfinite(b.probe)) or np.ptp(b.probe) == 0:
        raise RuntimeError("random MobileNetV2 produced degenerate logits")

    graph = helper.make_graph(
        b.nodes, "mobilenetv2_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       [1, 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgepack-examples-mobilenetv2",
                              producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = (f"MobileNetV2 (width {width_mult}) with RANDOM weights, seed {seed}; "
                        "for latency/size work only, not accuracy.")
    onnx.checker.check_model(model)
    return model


def count_parameters(model: onnx.ModelProto) -> int:
    """Total number of elements over all initializers (BN running stats included)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--calib", type=Path, help="write calibration inputs (.npz, key 'input')")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--val", type=Path, help="write validation inputs (.npz, key 'input')")
    ap.add_argument("--val-samples", type=int, default=64)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build and write the model and optional data files; returns an exit code."""
    args = parse_args(argv)
    model = build_mobilenetv2(seed=args.seed, resolution=args.resolution)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    args.output.write_bytes(data)
    print(f"wrote {args.output}: {count_parameters(model):,} parameters, "
          f"{len(data) / 1e6:.1f} MB")
    for path, n, stream in ((args.calib, args.calib_samples, _STREAM_CALIB),
                            (args.val, args.val_samples, _STREAM_VAL)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, input=smooth_images(n, args.resolution, args.seed, stream))
        print(f"wrote {path}: {n} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
