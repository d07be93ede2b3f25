"""Calibration must run in bounded memory however large the calibration set.

Calibrators that keep every intermediate activation of every sample are a known
failure (out-of-memory kills on real calibration sets). We run the real quantizer in
a child process on a model with a wide hidden layer and compare peak memory for a
small and a 24× larger calibration set of the same data: holding the activations
would add ~0.5 GB, streaming adds nothing measurable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import models

CHILD = r"""
import json, resource, sys
from pathlib import Path
from edgepack.data import open_dataset
from edgepack.modelio import graph_inputs, load_model
from edgepack.optimize.quantize import QuantOptions, quantize
src, calib, out, method = sys.argv[1:5]
model = load_model(src)
dataset = open_dataset(calib, graph_inputs(model), "calibration")
audit = quantize("static", Path(src), Path(out), QuantOptions(calibration_method=method), dataset)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "quantized": audit.weights_quantized}))
"""


def peak_kb(tmp: Path, samples: int, method: str) -> int:
    model_path = tmp / "wide.onnx"
    if not model_path.exists():
        onnx.save(models.wide_activation_mlp(), str(model_path))
    calib = tmp / f"calib{samples}.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((samples, 8)).astype(np.float32))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_path), str(calib), str(tmp / f"q{samples}.onnx"), method],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["quantized"] == 2
    return data["peak_kb"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_large_calibration_set_does_not_hold_all_activations_in_memory(tmp_path, method):
    small = peak_kb(tmp_path, 32, method)
    large = peak_kb(tmp_path, 768, method)
    # Each sample's hidden activations are 2 × 65536 floats = 512 KiB; keeping them for
    # 736 more samples would add ~368 MiB. Allow 64 MiB of noise (allocator, histograms).
    growth_mib = (large - small) / 1024
    assert growth_mib < 64, f"peak memory grew {growth_mib:.0f} MiB with the larger calibration set"
