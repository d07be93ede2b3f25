"""Small signed bundles for runtime tests, in the exact format `edgepack build` writes.

Built directly with the bundle writer (no quantization or measurement), so runtime
tests stay fast; the build pipeline's own tests cover the full path.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import generate_keypair, write_bundle

_FIXED = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(key + ".npy", date_time=_FIXED), member.getvalue())
    return buffer.getvalue()


def raw_classifier(scale: float = 1.0, seed: int = 0, nan: bool = False) -> onnx.ModelProto:
    """uint8 [N,4] raw input → Cast → /255 → MatMul → scores [N,3]; ``scale`` changes the weights.

    ``nan=True``: a model broken only on some inputs, the kind that passes its self-test and
    must be caught in probation: rows whose first value is 0 (live traffic has one) score
    NaN (``0 * log(0)``), the golden inputs (first values 8..221) stay finite.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 3)) * scale).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["raw"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["f", "k"], ["x"], name="scale"),
        helper.make_node("MatMul", ["x", "w"], ["mm_out" if nan else "scores"], name="mm"),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(255.0, np.float32), "k")]
    if nan:
        nodes += [
            helper.make_node("Gather", ["x", "first"], ["x0"], axis=1, name="first_column"),
            helper.make_node("Log", ["x0"], ["log_x0"], name="log"),
            helper.make_node("Mul", ["log_x0", "zero"], ["poison"], name="poison"),
            helper.make_node("Add", ["mm_out", "poison"], ["scores"], name="add"),
        ]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "first"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("raw", TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def keys(directory: Path) -> tuple[Path, Path]:
    """(private, public) key paths, generated once per directory."""
    priv, pub = directory / "test.key", directory / "test.pub"
    if not priv.exists():
        generate_keypair(directory, "test")
    return priv, pub


def make_bundle(
    out_dir: Path,
    key: Path,
    version: str = "1.0.0",
    model: onnx.ModelProto | None = None,
    *,
    golden_model: onnx.ModelProto | None = None,
    name: str = "toy",
) -> Path:
    """A signed bundle whose golden outputs come from ``golden_model`` (default: the model itself).

    Passing a different ``golden_model`` makes a bundle that fails its self-test.
    """
    import onnxruntime as ort

    model = model or raw_classifier()
    golden_model = golden_model or model
    raw = np.random.default_rng(1).integers(0, 256, (8, 4)).astype(np.uint8)
    sess = ort.InferenceSession(golden_model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"raw": raw})[0]
    variant = "onnx-fp32"
    manifest = {
        "format_version": 1,
        "name": name,
        "version": version,
        "io": {
            "inputs": [{"name": "raw", "dtype": "uint8", "shape": [None, 4], "value_range": [0, 255]}],
            "outputs": [{"name": "scores", "dtype": "float32", "shape": [None, 3], "labels": ["a", "b", "c"]}],
        },
        "variants": [{"id": variant, "file": f"models/{variant}.onnx", "engine": "onnxruntime", "precision": "fp32",
                      "min_runtime": "0.1.0", "devices": ["x86-gateway"]}],
        "golden": {"file": "golden/vectors.npz", "tolerances": {variant: {"scores": 1e-4}}},
    }
    members = {
        f"models/{variant}.onnx": model.SerializeToString(),
        "golden/vectors.npz": npz_bytes({"input:raw": raw, f"output:{variant}:scores": expected}),
    }
    out = out_dir / f"{name}-{version}.epk"
    write_bundle(out, manifest, members, key, source_date_epoch=0)
    return out
