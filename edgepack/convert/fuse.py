"""Fusing two TFLite models into one: a front (preprocessing) whose output feeds a model.

A TFLite source model passes through unchanged, but the device feeds RAW input, so the
declared preprocessing must run on LiteRT too, in front of it. Instead of a second file
and an engine that chains two interpreters, the preprocessing's own TFLite graph is
spliced into the model's flatbuffer: its buffers, operator codes and tensors are
appended, its operators run first and write the model's input tensor. The result is
one ``.tflite`` that a LiteRT-only device runs like any other. A quantized model input
(int8/uint8) gets a ``QUANTIZE`` op with the model's own scale and zero point.
"""

from __future__ import annotations

from ..errors import ModelError

__all__ = ["fuse_front"]

_QUANTIZED = ("INT8", "UINT8", "INT16")


def _opcode_key(code) -> tuple:
    return (code.builtinCode, code.deprecatedBuiltinCode, code.customCode, code.version)


def fuse_front(front: bytes, model: bytes, input_name: str, dequantize_outputs: bool = True) -> bytes:
    """One TFLite model computing ``model(front(x))``.

    Args:
        front: A single-input, single-output TFLite model (the preprocessing).
        model: The TFLite model with one input, of the front's output shape.
        input_name: Name of the fused model's input tensor (and signature entry).
        dequantize_outputs: Give quantized outputs a ``DEQUANTIZE`` op (float scores for
            the device, monitoring and the gates), keeping their names.

    Raises:
        ModelError: Either model has several inputs/subgraphs, or the shapes do not fit.
    """
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.convert_bytearray_to_object(bytearray(model))
    f = fu.convert_bytearray_to_object(bytearray(front))
    if len(f.subgraphs) != 1 or len(f.subgraphs[0].inputs) != 1 or len(f.subgraphs[0].outputs) != 1:
        raise ModelError("The preprocessing graph must have one input and one output; this is a bug in edgepack.")
    ms, fs = m.subgraphs[0], f.subgraphs[0]
    if len(ms.inputs) != 1:
        raise ModelError(f"The TFLite model has {len(ms.inputs)} inputs; embedded preprocessing needs a single-input model.")
    model_in = ms.tensors[ms.inputs[0]]
    front_out = fs.tensors[fs.outputs[0]]
    want, got = [int(d) for d in model_in.shape], [int(d) for d in front_out.shape]
    if want[1:] != got[1:]:
        raise ModelError(f"The declared preprocessing makes model inputs shaped {got}, but the TFLite model takes {want}; "
                         "fix the preprocessing (size, crop, layout) to match the model.")

    buffer_base = len(m.buffers)
    m.buffers.extend(f.buffers)
    codes = {_opcode_key(c): i for i, c in enumerate(m.operatorCodes)}
    code_map = {}
    for i, code in enumerate(f.operatorCodes):
        key = _opcode_key(code)
        if key not in codes:
            codes[key] = len(m.operatorCodes)
            m.operatorCodes.append(code)
        code_map[i] = codes[key]

    quantized_input = model_in.type != schema.TensorType.FLOAT32
    tensor_map: dict[int, int] = {}
    for i, tensor in enumerate(fs.tensors):
        if i == fs.outputs[0] and not quantized_input:
            tensor_map[i] = ms.inputs[0]  # the front writes the model's input tensor directly
            continue
        tensor.buffer = tensor.buffer + buffer_base
        tensor_map[i] = len(ms.tensors)
        ms.tensors.append(tensor)

    def remap(indices):
        return [tensor_map[int(i)] if int(i) >= 0 else -1 for i in indices]

    front_ops = []
    for op in fs.operators:
        op.opcodeIndex = code_map[op.opcodeIndex]
        op.inputs = remap(op.inputs)
        op.outputs = remap(op.outputs)
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = remap(op.intermediates)
        front_ops.append(op)
    if quantized_input:
        quantize = schema.OperatorCodeT()
        quantize.builtinCode = schema.BuiltinOperator.QUANTIZE
        quantize.deprecatedBuiltinCode = min(int(schema.BuiltinOperator.QUANTIZE), 127)
        quantize.version = 1
        key = _opcode_key(quantize)
        if key not in codes:
            codes[key] = len(m.operatorCodes)
            m.operatorCodes.append(quantize)
        op = schema.OperatorT()
        op.opcodeIndex = codes[key]
        op.inputs = [tensor_map[fs.outputs[0]]]
        op.outputs = [ms.inputs[0]]
        op.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
        op.builtinOptions = schema.QuantizeOptionsT()
        front_ops.append(op)
    ms.operators = front_ops + list(ms.operators)
    raw_index = tensor_map[fs.inputs[0]]
    ms.tensors[raw_index].name = input_name.encode()
    ms.inputs = np.array([raw_index], dtype=np.int32)
    for sig in m.signatureDefs or []:
        for entry in sig.inputs or []:
            entry.tensorIndex = raw_index
            entry.name = input_name.encode()
    if dequantize_outputs:
        _dequantize_outputs(m, ms, schema, codes)
    return bytes(fu.convert_object_to_bytearray(m))


def _dequantize_outputs(m, ms, schema, codes) -> None:
    """Append DEQUANTIZE for every quantized graph output; the float tensor takes over its name and place."""
    import copy

    import numpy as np

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    outputs = [int(i) for i in ms.outputs]
    for pos, index in enumerate(outputs):
        tensor = ms.tensors[index]
        if names.get(tensor.type) not in _QUANTIZED or tensor.quantization is None or tensor.quantization.scale is None:
            continue
        code = schema.OperatorCodeT()
        code.builtinCode = schema.BuiltinOperator.DEQUANTIZE
        code.deprecatedBuiltinCode = int(schema.BuiltinOperator.DEQUANTIZE)
        code.version = 2 if names.get(tensor.type) == "INT8" else 1
        key = _opcode_key(code)
        if key not in codes:
            codes[key] = len(m.operatorCodes)
            m.operatorCodes.append(code)
        out = copy.deepcopy(tensor)
        out.type = schema.TensorType.FLOAT32
        out.quantization = None
        out.buffer = 0
        out.name = tensor.name
        tensor.name = (tensor.name or b"output") + b"/quantized"
        ms.tensors.append(out)
        op = schema.OperatorT()
        op.opcodeIndex = codes[key]
        op.inputs = [index]
        op.outputs = [len(ms.tensors) - 1]
        ms.operators.append(op)
        outputs[pos] = len(ms.tensors) - 1
        for sig in m.signatureDefs or []:
            for entry in sig.outputs or []:
                if entry.tensorIndex == index:
                    entry.tensorIndex = len(ms.tensors) - 1
    ms.outputs = np.array(outputs, dtype=np.int32)
