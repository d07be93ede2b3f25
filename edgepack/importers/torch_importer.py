"""PyTorch modules, exported to ONNX by tracing and checked against PyTorch's own numbers.

Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): it works
offline with torch alone, while the newer dynamo exporter needs ``onnxscript``. The
export is traced on one example input, so the result is run on that input and on a
batch of another size; any difference from PyTorch is refused rather than shipped.

PyTorch is imported inside the importer, so edgepack works without it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import io
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError
from ..modelio import parse_model
from ._common import first_line, max_abs_diff, onnx_session, read_source_file, require_extra, run_session, source_file, tolerance
from .base import ImportedModel, SourceFile, TorchSource, split_module_spec

# Highest opset the TorchScript exporter of torch 2.x writes.
TORCHSCRIPT_MAX_OPSET = 20
# Largest accepted |onnx - torch| for outputs within [-1, 1]; scaled up for larger outputs.
ATOL = 1e-4
# A state_dict bigger than this is not a model for a small device.
MAX_WEIGHTS_BYTES = 2 * 1024**3


def _torch() -> ModuleType:
    return require_extra("torch", "PyTorch", "torch")


def _import_target(target: str, is_file: bool, spec: str) -> tuple[ModuleType, Path | None]:
    """Import the module named in ``spec``; return it and its source file (if known)."""
    if is_file:
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"model.module names the file {path}, which does not exist; check the path in {spec!r}.")
        name = f"_edgepack_user_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"model.module names {path}, which Python cannot load as a module; give a .py file.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        sys.path.insert(0, str(path.parent))  # let the file import its sibling modules
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - running user code can raise anything
            sys.modules.pop(name, None)
            raise ModelError(f"Running {path} failed ({type(exc).__name__}: {first_line(exc)}); fix the module file and retry.") from exc
        finally:
            sys.path.remove(str(path.parent))
        return module, path
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise ConfigError(
                f"Cannot import module {target!r} named in model.module; install it or add its folder to PYTHONPATH, "
                f"or give a file path such as 'models/net.py:{spec.rpartition(':')[2]}'."
            ) from exc
        raise ModelError(f"Importing {target!r} failed because it needs {exc.name!r}, which is not installed; install it and retry.") from exc
    except Exception as exc:  # noqa: BLE001 - running user code can raise anything
        raise ModelError(f"Importing {target!r} failed ({type(exc).__name__}: {first_line(exc)}); fix the module and retry.") from exc
    file = getattr(module, "__file__", None)
    return module, Path(file) if file else None


def _resolve_attribute(module: ModuleType, attr: str, target: str) -> Any:
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([target, *attr.split(".")[:i]]) if i else target
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it defines: {', '.join(public[:12]) or 'nothing public'}."
            raise ConfigError(f"model.module: {owner} has no attribute {part!r}; {hint}")
        obj = getattr(obj, part)
    return obj


def _instantiate(torch: ModuleType, spec: str) -> tuple[Any, Path | None]:
    """The ``nn.Module`` that ``spec`` names (calling a class/factory with no arguments)."""
    target, attr, is_file = split_module_spec(spec)
    module, file = _import_target(target, is_file, spec)
    obj = _resolve_attribute(module, attr, target)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ConfigError(f"model.module: {spec} is a {type(obj).__name__}, not a torch.nn.Module, class or factory function.")
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - user constructors can raise anything
            raise ModelError(
                f"Calling {spec}() failed ({type(exc).__name__}: {first_line(exc)}); model.module must name a class or "
                "factory that takes no arguments (wrap it in a small factory function if it needs some)."
            ) from exc
        if not isinstance(obj, torch.nn.Module):
            raise ConfigError(f"model.module: {spec}() returned a {type(obj).__name__}, not a torch.nn.Module.")
    return obj, file


def _load_failure(exc: BaseException) -> str:
    """The useful part of a torch.load error (its weights-only text is mostly boilerplate)."""
    marker = "WeightsUnpickler error:"
    text = str(exc)
    if marker in text:
        reason = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        reason = reason.split(" was not an allowed global")[0]
        if reason:
            return reason[:200]
    return first_line(exc, 200)


def _load_weights(torch: ModuleType, net: Any, path: Path, spec: str) -> SourceFile:
    data = read_source_file(path, "Weights file", limit=MAX_WEIGHTS_BYTES)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling a foreign file can raise anything
        raise ModelError(
            f"Weights file {path} is not a PyTorch state_dict that loads with weights_only=True ({_load_failure(exc)}); "
            "save only the weights with torch.save(model.state_dict(), path)."
        ) from exc
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = f" (its keys: {', '.join(map(str, list(state)[:6]))})" if isinstance(state, Mapping) else ""
        raise ModelError(
            f"Weights file {path} holds a {type(state).__name__}{keys}, not a state_dict of tensors; "
            "save only the weights with torch.save(model.state_dict(), path)."
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = "; ".join(line.strip().rstrip(".") for line in str(exc).splitlines()[1:3] if line.strip())[:400]
        raise ModelError(
            f"Weights file {path} does not fit {spec} ({details or first_line(exc)}); "
            "check that model.module names the same architecture the weights were saved from."
        ) from exc
    return source_file("weights", path, data)


def _example(torch: ModuleType, shape: tuple[int, ...], dtype_name: str, seed: int) -> Any:
    dtype = getattr(torch, dtype_name)
    if dtype.is_floating_point:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    return torch.zeros(shape, dtype=dtype)  # index-like inputs: 0 is valid for any vocabulary


def _run_torch(torch: ModuleType, net: Any, x: Any, source: TorchSource) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            result = net(x)
    except Exception as exc:  # noqa: BLE001 - user forward() can raise anything
        raise ConfigError(
            f"{source.module} fails on an example input of shape {list(x.shape)} and dtype {source.input_dtype} "
            f"({type(exc).__name__}: {first_line(exc)}); set model.input_shape and model.input_dtype to what the model takes."
        ) from exc
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
        raise ModelError(
            f"{source.module} returns a {type(result).__name__}; ONNX export needs forward() to return a tensor "
            "or a tuple of tensors."
        )
    return [t.detach().cpu().numpy() for t in outputs]


def _export(torch: ModuleType, net: Any, x: Any, outputs: list[np.ndarray], source: TorchSource) -> tuple[bytes, list[str]]:
    names = [source.output_name] if len(outputs) == 1 else [f"{source.output_name}_{i}" for i in range(len(outputs))]
    dynamic = {source.input_name: {0: "batch"}, **{n: {0: "batch"} for n, o in zip(names, outputs) if o.ndim > 0}}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but is the one that runs offline.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net, (x,), buffer, dynamo=False, opset_version=source.opset, input_names=[source.input_name],
                output_names=names, dynamic_axes=dynamic, do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - tracing and symbolic conversion raise many types
        raise ModelError(
            f"PyTorch could not export {source.module} to ONNX opset {source.opset} ({type(exc).__name__}: {first_line(exc)}); "
            "replace the unsupported operation or try another model.opset."
        ) from exc
    return buffer.getvalue(), names


def _verify(session: Any, torch: ModuleType, net: Any, source: TorchSource, x: Any, expected: list[np.ndarray], names: list[str]) -> None:
    """Refuse the export unless it matches PyTorch on the example batch and on a batch of another size."""
    batch = source.example_input_shape[0]
    other = _example(torch, (2 if batch != 2 else 3, *source.example_input_shape[1:]), source.input_dtype, seed=1)
    for inp, ref in ((x, expected), (other, None)):
        size = inp.shape[0]
        got = run_session(
            session, {source.input_name: inp.numpy()},
            f"The ONNX export of {source.module} cannot run a batch of {size}: the module probably fixes the batch size "
            "(for example x.view(1, -1)); use x.flatten(1) or x.view(x.size(0), -1)",
        )
        ref = ref if ref is not None else _run_torch(torch, net, inp, source)
        for name, want, have in zip(names, ref, got):
            diff, tol = max_abs_diff(want, have), tolerance(want, ATOL)
            if not diff <= tol:
                raise ModelError(
                    f"Exporting {source.module} to ONNX changed the numbers: output {name!r} differs from PyTorch by up to "
                    f"{diff:.3g} (tolerance {tol:.1g}) on a batch of {size}; tracing froze a Python branch or a "
                    "batch-size-specific step in forward(), so make it use tensor operations only."
                )


class TorchImporter:
    """Builds the module, loads its ``state_dict``, exports to ONNX and verifies the numbers."""

    kind = "pytorch"
    source_type = TorchSource

    def import_model(self, source: TorchSource) -> ImportedModel:
        """Export a PyTorch module to ONNX with a dynamic batch dimension.

        The module file (or importable module) is executed: only use code you trust.

        Raises:
            MissingExtraError: PyTorch is not installed.
            ConfigError: ``model.module`` cannot be found, or the example input does not fit.
            ModelError: The weights do not load or fit, export fails, or it changes the numbers.
        """
        if source.opset > TORCHSCRIPT_MAX_OPSET:
            raise ConfigError(f"model.opset {source.opset} is above {TORCHSCRIPT_MAX_OPSET}, the highest the PyTorch exporter writes; use {TORCHSCRIPT_MAX_OPSET} or lower.")
        torch = _torch()
        net, module_file = _instantiate(torch, source.module)
        files = [source_file("module", module_file)] if module_file is not None and module_file.is_file() else []
        if source.weights is not None:
            files.insert(0, _load_weights(torch, net, source.weights, source.module))
        net.eval()
        x = _example(torch, source.example_input_shape, source.input_dtype, seed=0)
        expected = _run_torch(torch, net, x, source)
        data, names = _export(torch, net, x, expected, source)
        label = f"ONNX export of {source.module}"
        model = parse_model(data, label, check=True)
        _verify(onnx_session(data, label), torch, net, source, x, expected, names)
        weights = f" with weights {source.weights.name}" if source.weights is not None else " with its weights as constructed"
        return ImportedModel(
            kind="onnx",
            description=(
                f"PyTorch {source.module.replace(chr(92), '/').rsplit('/', 1)[-1]}{weights}, exported to ONNX opset "
                f"{source.opset} by torch {torch.__version__.split('+')[0]}"
            ),
            source_files=tuple(files),
            model=model,
        )
