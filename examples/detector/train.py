"""Train a small object detector that finds framed photos on textured walls, on RAW RGB frames.

The device feeds raw uint8 RGB camera frames of any size; the letterbox (keep the aspect
ratio, pad centred) and the normalization are NOT device code: ``edgepack build``
embeds them into the model from ``edgepack.yaml``, and the embedded graph also returns
the letterbox transform so boxes map back to raw pixels. Training computes its
features with :func:`edgepack.preprocess.apply_reference` and the very same
:data:`SPEC`, so training-time and serving-time features are identical.

Data (offline, from ``skimage.data``): four photos are the objects -- astronaut,
chelsea (the cat), coffee, rocket -- pasted at random sizes and positions (1 to 3 per
frame, never overlapping) onto walls cut from the brick, grass, gravel and camera
textures. Held-out split: walls for validation are cut from the bottom half of each
texture and training walls from the top half; object appearance is jittered (crop,
brightness) with independent random streams.

The network is CenterNet-like: a stride-8 heat map per class plus a box size and a
centre offset per cell; the decode (3x3 peak keep, top-10 peaks, boxes) is part of the
ONNX graph, so the model emits ``boxes`` [N, 10, 4] (x0, y0, x1, y1 in model-input
pixels), ``scores`` [N, 10] and ``classes`` [N, 10] (int64).

Outputs (in ``--out-dir``, default: this script's directory):

* ``model.onnx`` -- input ``input`` float32 [N, 3, 64, 64], outputs as above.
* ``calib.npz``  -- ``raw`` uint8 [n, 72, 96, 3] training-distribution frames.
* ``val.npz``    -- held-out frames, same ``raw`` key, plus ground truth ``gt_boxes``
  float32 [n, 3, 4] (raw pixels, x0 y0 x1 y1) and ``gt_classes`` int64 [n, 3] (-1 = none).

Usage::

    python examples/detector/train.py [--out-dir DIR] [--seed 0] [--epochs 12] [--frames 6000]
"""

from __future__ import annotations

import os

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

OPSET = 17
IR_VERSION = 8

CLASSES = ("astronaut", "cat", "coffee", "rocket")
NUM_CLASSES = len(CLASSES)
#: Raw camera frame (height, width): 3:4, so the letterbox pads top and bottom.
RAW_SIZE = (72, 96)
#: Model input (height, width).
INPUT_HW = (64, 64)
STRIDE = 8
GRID = INPUT_HW[0] // STRIDE
TOP_K = 10
MAX_OBJECTS = 3
#: Object height range in raw pixels.
OBJECT_HEIGHT = (16, 44)
BRIGHTNESS = (0.7, 1.3)
CALIB_FRAMES = 48
VAL_FRAMES = 120

_STREAM_TRAIN, _STREAM_CALIB, _STREAM_VAL, _STREAM_MODEL = 0, 1, 2, 3


def spec():
    """The preprocessing declared in ``edgepack.yaml`` (``input.image``)."""
    from edgepack.preprocess import ImagePreprocess

    return ImagePreprocess(color="rgb", model_color="rgb", min_size=(16, 16), max_size=(2048, 2048),
                           letterbox=INPUT_HW, pad_value=(114,), interpolation="bilinear",
                           scale=1 / 255, mean=(0.5,), std=(0.25,), layout="NCHW")


# --------------------------------------------------------------------------- scenes


def load_objects() -> list[np.ndarray]:
    """The four object photos as uint8 [H, W, 3], in :data:`CLASSES` order."""
    from skimage import data

    return [np.ascontiguousarray(p, np.uint8) for p in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())]


def load_walls() -> list[np.ndarray]:
    """Gray textures, tinted to RGB, each [512, 512, 3]."""
    from skimage import data

    tints = ((1.0, 0.85, 0.7), (0.8, 1.0, 0.75), (0.95, 0.95, 1.0), (1.0, 1.0, 0.9))
    walls = []
    for gray, tint in zip((data.brick(), data.grass(), data.gravel(), data.camera()), tints):
        rgb = gray[..., None].astype(np.float32) * np.asarray(tint, np.float32)
        walls.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return walls


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def make_frame(rng: np.random.Generator, objects, walls, heldout: bool):
    """One raw frame with 1..MAX_OBJECTS non-overlapping objects; returns (frame, boxes, classes)."""
    h, w = RAW_SIZE
    wall = walls[rng.integers(len(walls))]
    # Training walls come from the top half of a texture, validation walls from the bottom half.
    y_lo, y_hi = (256, 512 - 2 * h) if heldout else (0, 256 - 2 * h)
    y0 = int(rng.integers(y_lo, max(y_lo + 1, y_hi)))
    x0 = int(rng.integers(0, 512 - 2 * w))
    frame = _resize(wall[y0:y0 + 2 * h, x0:x0 + 2 * w], RAW_SIZE).astype(np.float32)
    frame *= rng.uniform(*BRIGHTNESS)
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cls = int(rng.integers(NUM_CLASSES))
        photo = objects[cls]
        ph, pw = photo.shape[:2]
        # Jitter: a sub-crop of 85-100% of the photo, so no two pastes are the same pixels.
        ch, cw = int(ph * rng.uniform(0.85, 1.0)), int(pw * rng.uniform(0.85, 1.0))
        cy, cx = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        oh = int(rng.integers(*OBJECT_HEIGHT))
        ow = max(8, int(round(oh * cw / ch)))
        if ow >= w - 2 or oh >= h - 2:
            continue
        for _try in range(20):
            top, left = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
            box = (left, top, left + ow, top + oh)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        patch = _resize(photo[cy:cy + ch, cx:cx + cw], (oh, ow)).astype(np.float32) * rng.uniform(*BRIGHTNESS)
        frame[top:top + oh, left:left + ow] = patch
        boxes.append(box)
        classes.append(cls)
    return np.clip(frame, 0, 255).astype(np.uint8), boxes, classes


def scene_set(count: int, seed: int, stream: int, heldout: bool):
    """``count`` frames with padded ground truth: (raw, gt_boxes [n, 3, 4], gt_classes [n, 3])."""
    rng = np.random.default_rng([seed, stream])
    objects, walls = load_objects(), load_walls()
    raw = np.empty((count, *RAW_SIZE, 3), np.uint8)
    gt_boxes = np.zeros((count, MAX_OBJECTS, 4), np.float32)
    gt_classes = np.full((count, MAX_OBJECTS), -1, np.int64)
    for i in range(count):
        frame, boxes, classes = make_frame(rng, objects, walls, heldout)
        raw[i] = frame
        for j, (b, c) in enumerate(zip(boxes, classes)):
            gt_boxes[i, j] = b
            gt_classes[i, j] = c
    return raw, gt_boxes, gt_classes


def to_input(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features exactly as the bundle computes them, and the letterbox output row for the frame size."""
    from edgepack.preprocess import apply_reference

    s = spec()
    x = np.concatenate([apply_reference(s, raw[i:i + 256]) for i in range(0, len(raw), 256)])
    transform = np.asarray(s.letterbox_transform(raw.shape[1], raw.shape[2]), np.float32)
    return x.astype(np.float32), transform


def to_model_boxes(boxes: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Raw-pixel xyxy boxes -> model-input pixels (the inverse of ``unletterbox_boxes``)."""
    resized_h, resized_w, pad_top, pad_left, raw_h, raw_w = (float(v) for v in transform)
    out = boxes.astype(np.float32).copy()
    out[..., [0, 2]] = boxes[..., [0, 2]] * resized_w / raw_w + pad_left
    out[..., [1, 3]] = boxes[..., [1, 3]] * resized_h / raw_h + pad_top
    return out


# --------------------------------------------------------------------------- model


def targets(model_boxes: np.ndarray, classes: np.ndarray):
    """CenterNet targets: gaussian heat maps, and size/offset at each object's centre cell."""
    n = len(classes)
    heat = np.zeros((n, NUM_CLASSES, GRID, GRID), np.float32)
    reg = np.zeros((n, 4, GRID, GRID), np.float32)
    mask = np.zeros((n, 1, GRID, GRID), np.float32)
    yy, xx = np.mgrid[0:GRID, 0:GRID].astype(np.float32)
    for i in range(n):
        for b, c in zip(model_boxes[i], classes[i]):
            if c < 0:
                continue
            cx, cy = (b[0] + b[2]) / 2 / STRIDE, (b[1] + b[3]) / 2 / STRIDE
            bw, bh = (b[2] - b[0]) / STRIDE, (b[3] - b[1]) / STRIDE
            sigma = max(0.5, min(bw, bh) / 6)
            g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            heat[i, c] = np.maximum(heat[i, c], g)
            ix, iy = min(int(cx), GRID - 1), min(int(cy), GRID - 1)
            heat[i, c, iy, ix] = 1.0
            reg[i, :, iy, ix] = (cx - ix, cy - iy, np.log(bw), np.log(bh))
            mask[i, 0, iy, ix] = 1.0
    return heat, reg, mask


LAYERS = (("conv1", 3, 16, 2), ("conv2", 16, 32, 2), ("conv3", 32, 48, 2), ("conv4", 48, 48, 1))


def make_net():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for _, i, o, s in LAYERS)
            self.head = nn.Conv2d(48, NUM_CLASSES + 4, 1)

        def forward(self, x):
            for conv in self.convs:
                x = torch.relu(conv(x))
            return self.head(x)

    return Net()


def train(x: np.ndarray, model_boxes: np.ndarray, classes: np.ndarray, seed: int, epochs: int, batch: int = 64):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = make_net()
    heat_t, reg_t, mask_t = (torch.from_numpy(a) for a in targets(model_boxes, classes))
    xs = torch.from_numpy(x)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    steps = epochs * (-(-len(x) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    rng = np.random.default_rng([seed, _STREAM_MODEL])
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        losses = []
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            out = net(xs[idx])
            logit = out[:, :NUM_CLASSES]
            p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
            h = heat_t[idx]
            pos = (h == 1).float()
            # CenterNet's penalty-reduced focal loss.
            focal = -(pos * (1 - p) ** 2 * torch.log(p) + (1 - pos) * (1 - h) ** 4 * p**2 * torch.log(1 - p))
            focal = focal.sum() / pos.sum().clamp(min=1)
            m = mask_t[idx]
            reg = out[:, NUM_CLASSES:]
            pred = torch.cat([torch.sigmoid(reg[:, :2]), reg[:, 2:]], 1)
            l1 = (torch.abs(pred - reg_t[idx]) * m).sum() / m.sum().clamp(min=1)
            loss = focal + l1
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss))
        print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}", flush=True)
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _const(name: str, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype), name=name)


def build_onnx(state: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Backbone + head + decode, built node by node so the bytes are reproducible."""
    nodes, inits = [], []
    x = "input"
    for index, (name, _i, _o, stride) in enumerate(LAYERS):
        w, b = state[f"convs.{index}.weight"], state[f"convs.{index}.bias"]
        inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"{name}.bias")]
        nodes += [helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu")]
        x = f"{name}.relu"
    inits += [numpy_helper.from_array(state["head.weight"].astype(np.float32), "head.weight"),
              numpy_helper.from_array(state["head.bias"].astype(np.float32), "head.bias")]
    cells = GRID * GRID
    inits += [_const("split", [NUM_CLASSES, 2, 2]), _const("flat_heat", [0, NUM_CLASSES * cells]),
              _const("flat_reg", [0, 2, cells]), _const("k", [TOP_K]), _const("cells", cells),
              _const("grid", GRID), _const("one", [1]), _const("two_channels", [1, 2, 1]),
              numpy_helper.from_array(np.asarray(STRIDE, np.float32), "stride"),
              numpy_helper.from_array(np.asarray(0.5, np.float32), "half")]
    nodes += [
        helper.make_node("Conv", [x, "head.weight", "head.bias"], ["head"], name="head", kernel_shape=[1, 1]),
        helper.make_node("Split", ["head", "split"], ["heat_logits", "offset_logits", "log_size"], name="split", axis=1),
        helper.make_node("Sigmoid", ["heat_logits"], ["heat"], name="heat"),
        # Keep only 3x3 local maxima: the decode's NMS, as in CenterNet.
        helper.make_node("MaxPool", ["heat"], ["heat_max"], name="peak_pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Equal", ["heat", "heat_max"], ["is_peak"], name="is_peak"),
        helper.make_node("Cast", ["is_peak"], ["is_peak_f"], name="is_peak_f", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["heat", "is_peak_f"], ["peaks"], name="peaks"),
        helper.make_node("Reshape", ["peaks", "flat_heat"], ["peaks_flat"], name="peaks_flat"),
        helper.make_node("TopK", ["peaks_flat", "k"], ["scores", "top_index"], name="topk", axis=1),
        helper.make_node("Div", ["top_index", "cells"], ["classes"], name="classes"),
        helper.make_node("Mod", ["top_index", "cells"], ["cell"], name="cell"),
        helper.make_node("Div", ["cell", "grid"], ["cell_y"], name="cell_y"),
        helper.make_node("Mod", ["cell", "grid"], ["cell_x"], name="cell_x"),
        helper.make_node("Sigmoid", ["offset_logits"], ["offset"], name="offset"),
        helper.make_node("Exp", ["log_size"], ["size"], name="size"),
        helper.make_node("Reshape", ["offset", "flat_reg"], ["offset_flat"], name="offset_flat"),
        helper.make_node("Reshape", ["size", "flat_reg"], ["size_flat"], name="size_flat"),
        helper.make_node("Unsqueeze", ["cell", "one"], ["cell_1"], name="cell_1"),
        helper.make_node("Shape", ["cell_1"], ["cell_shape"], name="cell_shape"),
        helper.make_node("Mul", ["cell_shape", "two_channels"], ["gather_shape"], name="gather_shape"),
        helper.make_node("Expand", ["cell_1", "gather_shape"], ["cell_2"], name="cell_2"),
        helper.make_node("GatherElements", ["offset_flat", "cell_2"], ["off_k"], name="off_k", axis=2),
        helper.make_node("GatherElements", ["size_flat", "cell_2"], ["size_k"], name="size_k", axis=2),
        helper.make_node("Cast", ["cell_x"], ["cell_xf"], name="cell_xf", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["cell_y"], ["cell_yf"], name="cell_yf", to=TensorProto.FLOAT),
        helper.make_node("Split", ["off_k"], ["off_x", "off_y"], name="off_split", axis=1),
        helper.make_node("Split", ["size_k"], ["size_w", "size_h"], name="size_split", axis=1),
        helper.make_node("Squeeze", ["off_x", "one"], ["off_x1"], name="off_x1"),
        helper.make_node("Squeeze", ["off_y", "one"], ["off_y1"], name="off_y1"),
        helper.make_node("Squeeze", ["size_w", "one"], ["size_w1"], name="size_w1"),
        helper.make_node("Squeeze", ["size_h", "one"], ["size_h1"], name="size_h1"),
        helper.make_node("Add", ["cell_xf", "off_x1"], ["cx_cells"], name="cx_cells"),
        helper.make_node("Add", ["cell_yf", "off_y1"], ["cy_cells"], name="cy_cells"),
        helper.make_node("Mul", ["size_w1", "half"], ["half_w"], name="half_w"),
        helper.make_node("Mul", ["size_h1", "half"], ["half_h"], name="half_h"),
        helper.make_node("Sub", ["cx_cells", "half_w"], ["x0c"], name="x0c"),
        helper.make_node("Sub", ["cy_cells", "half_h"], ["y0c"], name="y0c"),
        helper.make_node("Add", ["cx_cells", "half_w"], ["x1c"], name="x1c"),
        helper.make_node("Add", ["cy_cells", "half_h"], ["y1c"], name="y1c"),
    ]
    for name in ("x0", "y0", "x1", "y1"):
        nodes += [helper.make_node("Mul", [f"{name}c", "stride"], [f"{name}p"], name=f"{name}p"),
                  helper.make_node("Unsqueeze", [f"{name}p", "two"], [f"{name}u"], name=f"{name}u")]
    inits.append(_const("two", [2]))
    nodes.append(helper.make_node("Concat", ["x0u", "y0u", "x1u", "y1u"], ["boxes"], name="boxes", axis=2))
    graph = helper.make_graph(
        nodes, "photo_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *INPUT_HW])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", TOP_K, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", TOP_K]),
         helper.make_tensor_value_info("classes", TensorProto.INT64, ["N", TOP_K])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgepack-examples-detector", producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = ("Finds framed photos (astronaut, cat, coffee, rocket) on walls. Input = SPEC-preprocessed "
                        "(letterbox 64x64, pad 114, (x/255-0.5)/0.25, NCHW); outputs top-10 boxes (model-input "
                        "pixels, xyxy), scores, classes.")
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- evaluation


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a [n, 4] and b [m, 4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def recall_precision(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, threshold=0.3, iou_min=0.5):
    """Greedy same-class matching at ``iou_min``; returns (recall, precision)."""
    tp = n_pred = n_gt = 0
    for pb, ps, pc, gb, gc in zip(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes):
        keep = ps >= threshold
        pb, pc = pb[keep], pc[keep]
        real = gc >= 0
        gb, gc = gb[real], gc[real]
        n_pred += len(pb)
        n_gt += len(gb)
        used = set()
        for i in np.argsort(-ps[keep]):
            if not len(gb):
                break
            ious = iou(pb[i:i + 1], gb)[0]
            ious[[j for j in range(len(gb)) if j in used or gc[j] != pc[i]]] = 0
            j = int(np.argmax(ious))
            if ious[j] >= iou_min:
                used.add(j)
                tp += 1
    return tp / max(n_gt, 1), tp / max(n_pred, 1)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """A compressed .npz with fixed zip timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, arr.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--frames", type=int, default=6000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    raw, gt_boxes, gt_classes = scene_set(args.frames, args.seed, _STREAM_TRAIN, heldout=False)
    x, transform = to_input(raw)
    # Horizontal flips double the data; boxes flip with the image.
    flipped = x[:, :, :, ::-1].copy()
    model_boxes = to_model_boxes(gt_boxes, transform)
    flipped_boxes = model_boxes.copy()
    flipped_boxes[..., 0], flipped_boxes[..., 2] = INPUT_HW[1] - model_boxes[..., 2], INPUT_HW[1] - model_boxes[..., 0]
    state = train(np.concatenate([x, flipped]), np.concatenate([model_boxes, flipped_boxes]),
                  np.concatenate([gt_classes, gt_classes]), args.seed, args.epochs)
    model = build_onnx(state)
    calib_raw, _, _ = scene_set(CALIB_FRAMES, args.seed, _STREAM_CALIB, heldout=False)
    val_raw, val_boxes, val_classes = scene_set(VAL_FRAMES, args.seed, _STREAM_VAL, heldout=True)

    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    vx, vt = to_input(val_raw)
    boxes, scores, classes = sess.run(None, {"input": vx})
    from edgepack.preprocess import unletterbox_boxes

    raw_boxes = unletterbox_boxes(boxes, vt)
    recall, precision = recall_precision(raw_boxes, scores, classes, val_boxes, val_classes)
    print(f"held-out frames: {VAL_FRAMES}; recall@0.5 {recall:.3f}, precision@0.5 {precision:.3f} (score >= 0.3)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "model.onnx").write_bytes(model.SerializeToString())
    save_npz(args.out_dir / "calib.npz", raw=calib_raw)
    save_npz(args.out_dir / "val.npz", raw=val_raw, gt_boxes=val_boxes, gt_classes=val_classes)
    (args.out_dir / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
