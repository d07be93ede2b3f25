"""``edgepack convert`` defects found on third-party models, each with the model kind that hit it.

* A detector's feature-map outputs came back channels-last from onnx2tf and were refused as
  "a different shape"; they are now transposed back inside the TFLite graph.
* An int8 conversion whose division by a near-zero divisor made LiteRT's DIV kernel refuse its
  input ended in "internal error … exit 70"; it is a refusal naming the op now.
* Standard CNN building blocks (ResNet basic block, MobileNetV2 inverted residual, SqueezeNet
  fire module, ShuffleNetV2 channel shuffle) exported by torch.onnx at opset 17 convert at
  every precision and agree with onnxruntime.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_tflite import needs_tflite, run_cli


def detector() -> onnx.ModelProto:
    """A text-detector-like head: probability map [N, 1, 16, 16] and box map [N, 4, 8, 8]."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(0, .3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(rng.normal(0, .3, (1, 8, 1, 1)).astype(np.float32), "wp"),
             nh.from_array(rng.normal(0, .3, (4, 8, 3, 3)).astype(np.float32), "wb")]
    nodes = [h.make_node("Conv", ["image", "w1"], ["f0"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["f0"], ["f"]),
             h.make_node("Conv", ["f", "wp"], ["p0"]),
             h.make_node("Sigmoid", ["p0"], ["prob"]),
             h.make_node("Conv", ["f", "wb"], ["box"], pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = h.make_graph(nodes, "det", [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, 16, 16])],
                         [h.make_tensor_value_info("prob", T.FLOAT, ["N", 1, 16, 16]),
                          h.make_tensor_value_info("box", T.FLOAT, ["N", 4, 8, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def rms_normalizer() -> onnx.ModelProto:
    """A file-type-classifier-like front: x / (rms(x) + 1e-6), then Gemm. All-zero rows (padding)
    make the divisor 1e-6, which int8 quantizes to zero."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array([1e-6], np.float32), "eps"),
             nh.from_array(rng.normal(0, .5, (16, 4)).astype(np.float32), "W"), nh.from_array(np.zeros(4, np.float32), "b")]
    nodes = [h.make_node("Mul", ["x", "x"], ["sq"]), h.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
             h.make_node("Sqrt", ["ms"], ["rms"]), h.make_node("Add", ["rms", "eps"], ["den"]),
             h.make_node("Div", ["x", "den"], ["xn"]), h.make_node("Gemm", ["xn", "W", "b"], ["logits"])]
    graph = h.make_graph(nodes, "filetype", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- layout (pure)


def test_layout_match_undoes_channels_last_and_reorders():
    from edgepack.convert.layout import match_outputs

    rng = np.random.default_rng(0)
    prob, box = rng.normal(size=(1, 1, 6, 5)), rng.normal(size=(1, 4, 3, 3))
    matches = match_outputs([box.transpose(0, 2, 3, 1), prob.transpose(0, 2, 3, 1)], [prob, box])
    assert [(m.source, m.perm) for m in matches] == [(1, (0, 3, 1, 2)), (0, (0, 3, 1, 2))]
    assert all(m.max_abs_error == 0 for m in matches)


def test_layout_match_decides_by_values_when_shapes_tie():
    """C == H == W: every permutation has the right shape; only the values tell which one onnx2tf applied."""
    from edgepack.convert.layout import match_outputs

    x = np.random.default_rng(1).normal(size=(1, 4, 4, 4))
    (m,) = match_outputs([x.transpose(0, 2, 3, 1)], [x])
    assert m.perm == (0, 3, 1, 2) and m.max_abs_error == 0
    (same,) = match_outputs([x], [x])
    assert same.perm is None  # no transpose the values do not ask for


def test_layout_match_gives_up_on_an_incompatible_output():
    from edgepack.convert.layout import match_outputs

    assert match_outputs([np.zeros((1, 5))], [np.zeros((1, 4))]) is None


# --------------------------------------------------------------------------- kernel errors (pure)


def test_litert_kernel_failure_is_parsed_into_op_node_and_check():
    from edgepack.convert.kernel_errors import kernel_error, parse_kernel_failure
    from edgepack.errors import GateError

    message = "tflite/kernels/div.cc:262 data[i] != zero_point was not true.Node number 5 (DIV) failed to invoke."
    failure = parse_kernel_failure(message)
    assert (failure.op, failure.node, failure.kernel, failure.check) == ("DIV", 5, "div", "data[i] != zero_point")
    error = kernel_error(RuntimeError(message), "the TFLite int8 model")
    assert isinstance(error, GateError) and error.exit_code == 1
    assert str(error).startswith("The TFLite int8 model failed: LiteRT's DIV kernel (node 5) refused its input")
    assert "divisor was quantized to zero" in str(error)
    other = parse_kernel_failure("tensorflow/lite/kernels/reshape.cc:92 num_input_elements != num_output_elements (6 != 4)"
                                 " was not true.Node number 2 (RESHAPE) failed to prepare.")
    assert other.op == "RESHAPE" and other.kernel == "reshape" and "quantized" not in other.describe()


# --------------------------------------------------------------------------- conversions


@needs_tflite
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_channels_last_detector_outputs_come_back_in_the_onnx_layout(precision, tmp_path):
    import onnxruntime as ort

    from edgepack.convert.tflite import LiteRTSession

    onnx.save(detector(), tmp_path / "det.onnx")
    data = np.random.default_rng(2).uniform(0, 1, (24, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "cal.npy", data)
    out = tmp_path / "det.tflite"
    code, stdout, stderr = run_cli("convert", tmp_path / "det.onnx", "--quantize", precision, "--calibration",
                                   tmp_path / "cal.npy", "--validation", tmp_path / "cal.npy", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert any("output 'prob'" in n and "channels-last" in n for n in report["notes"]), report["notes"]
    sess = LiteRTSession(out.read_bytes())
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("prob", [1, 1, 16, 16]), ("box", [1, 4, 8, 8])]
    ref = ort.InferenceSession((tmp_path / "det.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, {"image": data[:4]}), ref.run(None, {"image": data[:4]})
    bound = 1e-4 if precision == "fp32" else 0.05
    for g, w in zip(got, want):
        assert g.shape == w.shape and float(np.max(np.abs(g - w))) < bound


@needs_tflite
def test_int8_divisor_quantized_to_zero_is_refused_naming_the_div_kernel(tmp_path):
    onnx.save(rms_normalizer(), tmp_path / "ft.onnx")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 16)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    x[::8] = 0  # all-zero rows, as padded byte windows of a file-type classifier
    np.save(tmp_path / "cal.npy", x)
    out = tmp_path / "ft.tflite"
    code, stdout, stderr = run_cli("convert", tmp_path / "ft.onnx", "--quantize", "int8", "--calibration", tmp_path / "cal.npy",
                                   "-o", out)
    assert code == 1, (stdout, stderr)  # was: "internal error (RuntimeError: ...)", exit 70
    assert "internal error" not in stderr and "Traceback" not in stderr
    assert "LiteRT's DIV kernel" in stderr and "validation samples 0-" in stderr and "Refusing this variant" in stderr
    assert not out.exists()
    # The float conversion of the same model is fine: the refusal is about int8.
    code, stdout, stderr = run_cli("convert", tmp_path / "ft.onnx", "--quantize", "fp32", "--calibration", tmp_path / "cal.npy",
                                   "-o", out)
    assert code == 0, stderr


# --------------------------------------------------------------------------- standard CNN blocks


def _torch_blocks():
    import torch
    from torch import nn

    class Basic(nn.Module):  # ResNet basic block with a strided projection shortcut
        def __init__(self, c=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.c3, self.b3 = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c)
            self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * c, 5)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
            x = torch.relu(self.b3(self.c3(x)) + self.down(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    class InvertedResidual(nn.Module):  # MobileNetV2: expand, depthwise, project, residual; ReLU6
        def __init__(self, c=8):
            super().__init__()
            e = 4 * c
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
            self.block = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
                                       nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
                                       nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
            self.head = nn.Linear(c, 5)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.block(x)
            return self.head(nn.functional.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1))

    class Fire(nn.Module):  # SqueezeNet: squeeze 1x1, expand 1x1 and 3x3, concat; conv classifier
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True))
            self.sq, self.e1, self.e3 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)
            self.cls = nn.Sequential(nn.Conv2d(16, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)))

        def forward(self, x):
            q = torch.relu(self.sq(self.stem(x)))
            return torch.flatten(self.cls(torch.cat([torch.relu(self.e1(q)), torch.relu(self.e3(q))], 1)), 1)

    class Shuffle(nn.Module):  # ShuffleNetV2: chunk, branch, concat, 5-D channel shuffle, mean([2, 3])
        def __init__(self, c=8):
            super().__init__()
            half = c // 2
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.branch = nn.Sequential(nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                        nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half))
            self.fc = nn.Linear(c, 5)

        def forward(self, x):
            a, b = self.stem(x).chunk(2, dim=1)
            x = torch.cat((a, self.branch(b)), dim=1)
            n, c, hh, ww = x.size()
            x = x.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, c, hh, ww)
            return self.fc(x.mean([2, 3]))

    return {"resnet-basic": Basic, "mobilenet-inverted-residual": InvertedResidual, "squeezenet-fire": Fire,
            "shufflenet-shuffle": Shuffle}


def _export(name: str) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    net = _torch_blocks()[name]().eval()
    with torch.no_grad():
        for module in net.modules():  # non-trivial BatchNorm statistics, as a trained net has
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), buffer, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


@needs_tflite
@pytest.mark.parametrize("name", ["resnet-basic", "mobilenet-inverted-residual", "squeezenet-fire", "shufflenet-shuffle"])
def test_standard_cnn_blocks_convert_and_agree_with_onnxruntime(name):
    from edgepack.convert.tflite import convert_onnx_to_tflite, validate_tflite

    model = _export(name)
    data = {"input": np.random.default_rng(3).normal(size=(24, 3, 32, 32)).astype(np.float32)}
    result = convert_onnx_to_tflite(model, ("fp32", "int8"), data)
    for precision in ("fp32", "int8"):
        report = validate_tflite(model, result.models[precision], data, precision=precision)
        assert report.passed and report.samples == 24
    fp32 = validate_tflite(model, result.models["fp32"], data, precision="fp32")
    assert fp32.max_abs_error < 1e-4 and fp32.agreement == 1.0


# --------------------------------------------------------------------------- padded MaxPool after Relu


def resnet_stem(ceil_mode: int = 0, pads=(1, 1, 1, 1), concat: bool = False, relu: bool = True) -> onnx.ModelProto:
    """ResNet's stem (Conv-Relu-MaxPool 3x3/2 pad 1) and head; ``concat`` pools a Concat of
    two Relus like SqueezeNet's fire modules; ``relu=False`` pools a raw Conv output."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(0, .3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(rng.normal(0, .3, (8, 3, 3, 3)).astype(np.float32), "w2"),
             nh.from_array(rng.normal(0, .3, (16 if concat else 8, 5)).astype(np.float32), "W"),
             nh.from_array(np.zeros(5, np.float32), "b")]
    nodes = [h.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2])]
    pooled = "c1"
    if relu:
        nodes.append(h.make_node("Relu", ["c1"], ["r1"]))
        pooled = "r1"
    if concat:
        nodes += [h.make_node("Conv", ["image", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  h.make_node("Relu", ["c2"], ["r2"]), h.make_node("Concat", ["r1", "r2"], ["cat"], axis=1)]
        pooled = "cat"
    nodes += [h.make_node("MaxPool", [pooled], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=list(pads), ceil_mode=ceil_mode),
              h.make_node("GlobalAveragePool", ["p"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
              h.make_node("Gemm", ["f", "W", "b"], ["logits"])]
    graph = h.make_graph(nodes, "stem", [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, 31, 31])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 5])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _static(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


@pytest.mark.parametrize("kind", ["pads", "ceil_mode", "concat"])
def test_relu_maxpool_is_zero_padded_bit_exactly(kind):
    import onnxruntime as ort

    from edgepack.convert.maxpool import zero_pad_relu_maxpools

    model = _static(resnet_stem(**{"pads": {}, "ceil_mode": {"ceil_mode": 1, "pads": (0, 0, 0, 0)},
                                   "concat": {"concat": True}}[kind]))
    sample = {"image": np.random.default_rng(1).normal(size=(1, 3, 31, 31)).astype(np.float32)}
    rewritten, count = zero_pad_relu_maxpools(model, sample)
    assert count == 1
    pools = [n for n in rewritten.graph.node if n.op_type == "MaxPool"]
    assert not any(a.name in ("pads", "ceil_mode") and any(np.atleast_1d(h.get_attribute_value(a))) for a in pools[0].attribute)
    assert any(n.op_type == "Pad" for n in rewritten.graph.node)
    rng = np.random.default_rng(2)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(5):
        x = {"image": rng.normal(size=(1, 3, 31, 31)).astype(np.float32)}
        np.testing.assert_array_equal(before.run(None, x)[0], after.run(None, x)[0])


def test_maxpool_of_a_signed_tensor_keeps_its_minus_infinity_padding():
    """Without a Relu in front, a 0 pad could win a window of negatives: left alone."""
    from edgepack.convert.maxpool import zero_pad_relu_maxpools

    model = _static(resnet_stem(relu=False))
    sample = {"image": np.random.default_rng(1).normal(size=(1, 3, 31, 31)).astype(np.float32)}
    rewritten, count = zero_pad_relu_maxpools(model, sample)
    assert count == 0 and rewritten is model


@needs_tflite
def test_int8_resnet_stem_loads_in_litert(tmp_path, monkeypatch):
    """ResNet-18, SqueezeNet 1.0 and ShuffleNetV2 int8 TFLite did not load ("XNNPACK ... failed to
    prepare"): onnx2tf pads their MaxPool with the float minimum, which int8 gives a scale of 1e36."""
    from edgepack.convert import maxpool
    from edgepack.convert.tflite import LiteRTSession

    onnx.save(resnet_stem(), tmp_path / "stem.onnx")
    data = np.random.default_rng(3).normal(size=(16, 3, 31, 31)).astype(np.float32)
    np.save(tmp_path / "cal.npy", data)
    out = tmp_path / "stem.tflite"
    code, stdout, stderr = run_cli("convert", tmp_path / "stem.onnx", "--quantize", "int8", "--calibration", tmp_path / "cal.npy",
                                   "--validation", tmp_path / "cal.npy", "-o", out, "--json")
    assert code == 0, stderr
    assert any("MaxPool" in n and "padded with 0" in n for n in json.loads(stdout)["notes"])
    LiteRTSession(out.read_bytes()).run(None, {"image": data[:1]})
    # The defect itself: without the rewrite the same conversion is refused, nothing written.
    monkeypatch.setattr(maxpool, "zero_pad_relu_maxpools", lambda model, sample: (model, 0))
    out.unlink()
    code, stdout, stderr = run_cli("convert", tmp_path / "stem.onnx", "--quantize", "int8", "--calibration", tmp_path / "cal.npy",
                                   "--validation", tmp_path / "cal.npy", "-o", out)
    assert code != 0 and not out.exists(), (stdout, stderr)
    # The 1e36 scale either stops XNNPACK (the torchvision nets) or flattens the activations (this stem).
    assert any(s in stderr for s in ("does not load in the LiteRT interpreter", "failed to prepare", "diverges")), stderr
