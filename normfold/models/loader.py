"""Resolve a model reference into an eval-mode ``nn.Module`` plus example inputs.

References (DESIGN.md):

* ``zoo:NAME``: a built-in model from :data:`normfold.models.registry.ZOO`.
* ``path/to/file.py:factory``: a file, imported under a unique module name (two files called
  ``model.py`` never collide in ``sys.modules``).
* ``package.module:factory``: an importable module.

A factory returns an ``nn.Module`` or ``(module, example_inputs)`` where ``example_inputs`` is a tensor or a
tuple of tensors. Input names come from ``forward``'s signature, or from ``--input`` specs when given.
Every failure is a :class:`ModelLoadError` or :class:`InputSpecError` with a one-line message.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import pickle
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normfold.errors import InputSpecError, ModelLoadError
from normfold.io import load_npz
from normfold.models.guard import user_code
from normfold.models.registry import ZOO, InputSpec, seeded_inputs

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "LoadedModel", "load_inputs_npz", "load_model", "parse_input_spec"]

#: Names accepted for ``--input NAME:SHAPE:DTYPE``.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

_SPEC_FORMAT = "NAME:DIMxDIM[:DTYPE]"
_REF_FORMS = "zoo:NAME, path/to/file.py:factory or package.module:factory"
_MAX_LISTED = 8


@dataclass
class LoadedModel:
    """A resolved model reference: the module in eval mode and what to feed it."""

    ref: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    input_specs: tuple[InputSpec, ...]
    was_training: bool
    #: Where ``example_inputs`` came from, as reports print it.
    input_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "module": type(self.module).__name__,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "inputs": [spec.describe() for spec in self.input_specs],
            "was_training": self.was_training,
            "input_source": self.input_source,
        }


# --------------------------------------------------------------------------------------------------------
# Input specs


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``x:1x3x224x224`` or ``x:1x3x224x224:float16`` into an :class:`InputSpec`."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InputSpecError(f"expected {_SPEC_FORMAT}, got {text!r}")
    name, shape_text = parts[0], parts[1]
    if not name.replace(".", "_").replace("-", "_").isidentifier():
        raise InputSpecError(f"expected {_SPEC_FORMAT} with NAME an identifier, got {text!r}")
    try:
        dims = tuple(int(d) for d in shape_text.lower().split("x"))
    except ValueError:
        raise InputSpecError(f"expected {_SPEC_FORMAT}, got {text!r}") from None
    bad = [d for d in dims if d <= 0]
    if bad:
        raise InputSpecError(f"dimensions must be positive, got {bad[0]} in {text!r}")
    dtype = torch.float32
    if len(parts) == 3:
        key = parts[2].strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise InputSpecError(f"unknown dtype {parts[2]!r} in {text!r}; expected one of {', '.join(sorted(DTYPES))}")
        dtype = DTYPES[key]
    return InputSpec(name, dims, dtype)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    if dtype == torch.bfloat16:  # numpy has no bfloat16: the file holds float32 (or similar)
        return None
    return torch.empty((), dtype=dtype).numpy().dtype


def load_inputs_npz(path: str | Path, specs_or_names: Sequence[InputSpec] | Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Read real input data from an ``.npz`` and check it against the model's inputs.

    With specs, each array must have the spec's shape and dtype (bfloat16 inputs accept a float array and
    are cast). With names only, only presence is checked. Extra arrays are ignored with a log line, so one
    file can also carry expected outputs.
    """
    path = Path(path)
    specs = [s if isinstance(s, InputSpec) else None for s in specs_or_names]
    names = [s.name if isinstance(s, InputSpec) else str(s) for s in specs_or_names]
    arrays = load_npz(path)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputSpecError(
            f"inputs file {path} has no array {missing[0]!r} "
            f"(has: {', '.join(sorted(arrays)) or 'nothing'}); the model's inputs are {', '.join(names)}"
        )
    extra = sorted(set(arrays) - set(names))
    if extra:
        logger.info("ignoring arrays not among the model inputs in %s: %s", path, ", ".join(extra))
    tensors = []
    for name, spec in zip(names, specs, strict=True):
        array = arrays[name]
        if spec is not None:
            if tuple(array.shape) != spec.shape:
                raise InputSpecError(
                    f"input {name!r} in {path} has shape {'x'.join(map(str, array.shape))}, "
                    f"expected {'x'.join(map(str, spec.shape))}"
                )
            expected = _numpy_dtype(spec.dtype)
            if expected is None:
                if array.dtype.kind != "f":
                    raise InputSpecError(f"input {name!r} in {path} is {array.dtype}, expected a float array")
            elif array.dtype != expected:
                raise InputSpecError(
                    f"input {name!r} in {path} is {array.dtype}, expected {expected} "
                    f"(save it with array.astype(np.{expected}))"
                )
        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        if spec is not None and spec.dtype == torch.bfloat16:
            tensor = tensor.to(torch.bfloat16)
        tensors.append(tensor)
    return tuple(tensors)


# --------------------------------------------------------------------------------------------------------
# Resolving references


def _closest(word: str, candidates: Sequence[str]) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.7)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _import_file(path: Path) -> Any:
    """Import a ``.py`` file under a unique module name, with its directory importable while it runs."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (expected {_REF_FORMS})")
    module_name = f"_normfold_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses/pickling inside the file can find their module.
    sys.modules[module_name] = module
    directory = str(path.resolve().parent)
    sys.path.insert(0, directory)
    try:
        with user_code(f"importing {path}", ModelLoadError):
            spec.loader.exec_module(module)
    except ModelLoadError:
        sys.modules.pop(module_name, None)
        raise
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
    return module


def _import_module(name: str) -> Any:
    try:
        with user_code(f"importing {name!r}", ModelLoadError, catch_all=False):
            return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ModelLoadError(
                f"module not found: {name!r} (is it installed or on PYTHONPATH? for a file use path/to/file.py:factory)"
            ) from e
        raise ModelLoadError(f"importing {name!r} failed: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"importing {name!r} raised {type(e).__name__}: {e}") from e


def _resolve_factory(ref: str) -> Any:
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ModelLoadError(f"expected a model reference like {_REF_FORMS}, got {ref!r}")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(Path(target)) if is_file else _import_module(target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelLoadError(f"{target!r} has no attribute {attr!r}{_closest(part, names)}")
        obj = getattr(obj, part)
    return obj


def _call_factory(ref: str, factory: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    if isinstance(factory, nn.Module):
        result: Any = factory
    elif callable(factory):
        with user_code(f"factory {ref!r}", ModelLoadError):
            result = factory()
    else:
        raise ModelLoadError(
            f"{ref!r} is not callable ({type(factory).__name__}); expected a factory function or class"
        )
    expected = "expected an nn.Module or (nn.Module, example_inputs)"
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        module, example = result
        if isinstance(example, torch.Tensor):
            return module, (example,)
        if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
            return module, tuple(example)
        raise ModelLoadError(
            f"factory {ref!r} returned example inputs of type {type(example).__name__}; "
            f"expected a tensor or a tuple of tensors"
        )
    raise ModelLoadError(f"factory {ref!r} returned {type(result).__name__}; {expected}")


def _forward_names(module: nn.Module) -> tuple[list[str], int, bool]:
    """Positional parameter names of ``forward``, how many are required, and whether it takes ``*args``."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return [], 0, True
    positional = [
        p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(1 for p in positional if p.default is inspect.Parameter.empty)
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    return [p.name for p in positional], required, varargs


def _check_arity(ref: str, module: nn.Module, count: int, what: str) -> None:
    names, required, varargs = _forward_names(module)
    if count < required or (count > len(names) and not varargs):
        arity = f"{required}" if required == len(names) else f"{required} to {len(names)}"
        raise InputSpecError(
            f"{ref!r}: got {count} {what}, but forward({', '.join(names)}) takes {arity}"
            + (" (pass one --input per forward argument)" if what == "--input specs" else "")
        )


def _names_for(module: nn.Module, count: int) -> list[str]:
    names, _, _ = _forward_names(module)
    return [names[i] if i < len(names) else f"input_{i}" for i in range(count)]


def _specs_from_tensors(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[InputSpec, ...]:
    return tuple(InputSpec(n, tuple(t.shape), t.dtype) for n, t in zip(names, tensors, strict=True))


# --------------------------------------------------------------------------------------------------------
# Weights


def _format_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _extract_state_dict(path: Path, obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ModelLoadError(
            f"checkpoint {path} holds a {type(obj).__name__}; expected a state_dict "
            f"(or a dict with a 'state_dict' or 'model' entry)"
        )
    non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise ModelLoadError(
            f"checkpoint {path} is not a state_dict: entries {_format_keys(non_tensor)} are not tensors"
        )
    return obj


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The specific reason from torch's long weights_only message (kept by its chained error)."""
    inner = error.__cause__ or error.__context__
    text = str(inner) if isinstance(inner, pickle.UnpicklingError) else str(error)
    text = text.split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    return first.split(". ")[0].rstrip(".") if ". " in first else first


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``module`` strictly, never executing code from its pickle.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a pickle that would
    call anything else raises ``UnpicklingError`` before running it, which we turn into a refusal.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "global" in detail.lower():
            raise ModelLoadError(
                f"refused to load {path}: its pickle would run code or build objects other than tensors "
                f"(torch.load weights_only=True: {detail}); save a plain state_dict with "
                f"torch.save(model.state_dict(), path)"
            ) from e
        raise ModelLoadError(
            f"cannot read checkpoint {path}: not a torch checkpoint, or one using pickle features that "
            f"weights_only=True refuses ({detail})"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    state = _extract_state_dict(path, obj)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_format_keys(shapes)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': strip the DataParallel prefix before saving)"
        raise ModelLoadError(f"weights {path} do not fit the model: {'; '.join(parts)}{hint}")
    with user_code(f"loading weights {path} into the model", ModelLoadError):
        module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------
# Entry point


def load_model(
    ref: str,
    weights: str | Path | None = None,
    inputs: Sequence[InputSpec] | None = None,
    seed: int | None = None,
) -> LoadedModel:
    """Resolve ``ref`` to an eval-mode module with example inputs.

    ``inputs`` (parsed ``--input`` specs) override the shapes the reference provides and name the inputs;
    without them, names come from ``forward``'s signature. Example inputs from specs are drawn with
    :func:`seeded_inputs` using ``seed`` (0 when None). A factory's own example inputs are used as they
    are, so an explicit ``seed`` for them is refused rather than silently ignored.
    """
    example: tuple[torch.Tensor, ...] | None
    specs: tuple[InputSpec, ...] | None = None
    if ref.startswith("zoo:"):
        name = ref.removeprefix("zoo:")
        entry = ZOO.get(name)
        if entry is None:
            available = ", ".join(sorted(ZOO))
            raise ModelLoadError(f"unknown zoo model {name!r}{_closest(name, sorted(ZOO))} (available: {available})")
        module = entry.build()
        specs = entry.inputs
        example = None
    else:
        module, example = _call_factory(ref, _resolve_factory(ref))

    was_training = any(m.training for m in module.modules())
    if weights is not None:
        load_weights(module, weights)
    with user_code(f"{type(module).__name__}.eval()", ModelLoadError):
        module.eval()
    if was_training:
        logger.info("%s arrived in training mode; switched to eval", ref)
    source = f"seeded random (seed {seed or 0})"

    if inputs:
        given = len(example) if example is not None else len(specs) if specs is not None else None
        if given is not None and len(inputs) != given:
            raise InputSpecError(
                f"{ref!r} takes {given} input(s) ({', '.join(_names_for(module, given))}), "
                f"got {len(inputs)} --input spec(s)"
            )
        _check_arity(ref, module, len(inputs), "--input specs")
        specs = tuple(inputs)
        example = seeded_inputs(specs, seed or 0)
    elif specs is not None:
        example = seeded_inputs(specs, seed or 0)
    elif example is not None:
        if seed is not None:
            raise InputSpecError(
                f"--seed {seed} would be ignored: {ref!r} supplies its own example inputs; "
                f"pass --input NAME:SHAPE to draw seeded random inputs instead"
            )
        _check_arity(ref, module, len(example), "example inputs")
        specs = _specs_from_tensors(_names_for(module, len(example)), example)
        source = f"example inputs from the factory {ref}"
    else:
        names, _, _ = _forward_names(module)
        hint = " ".join(f"--input {n}:1x3x224x224" for n in names) or "--input x:1x3x224x224"
        raise InputSpecError(
            f"{ref!r} gives no example inputs; pass their shapes with --input NAME:DIMxDIM[:DTYPE] "
            f"(e.g. {hint}) or return (module, example_inputs) from the factory"
        )
    return LoadedModel(
        ref=ref,
        module=module,
        example_inputs=example,
        input_names=[s.name for s in specs],
        input_specs=specs,
        was_training=was_training,
        input_source=source,
    )
