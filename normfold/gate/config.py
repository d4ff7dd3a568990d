"""The gate's declarative config: one file, many models, one verdict.

The config lives in ``normfold.toml`` (top level) or in ``[tool.normfold]`` of ``pyproject.toml``, and
is validated by the pydantic models below. Every model forbids unknown keys, so a typo such as
``tolerence = 1e-3`` is a :class:`~normfold.errors.ConfigError` naming the key and the file instead of a
silently ignored setting.

Precedence, lowest first: built-in defaults (:class:`CaseSettings`' field defaults) → the file's
``[defaults]`` table → a model's own keys → command-line flags (the ``overrides`` of
:func:`~normfold.gate.runner.run_gate`). Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from normfold.errors import ConfigError, NormfoldError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

ExecutorName = Literal["local", "process", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "process", "ray")
PRECISION_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OutputTolerance(_Strict):
    """Tolerance for one named ONNX output; unset fields fall back to the model's tolerance."""

    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)


class CaseSettings(_Strict):
    """Settings every model inherits from ``[defaults]`` and may override; field defaults are the built-ins."""

    backends: list[str] = Field(default_factory=lambda: ["ort-cpu"])
    precisions: list[str] = Field(default_factory=lambda: ["fp32"])
    opset: int = Field(default=21, ge=7)
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    optimize: bool = True
    passes: list[str] | None = None
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)
    outputs: dict[str, OutputTolerance] = Field(default_factory=dict)
    per_layer: bool = True
    fail_on: Literal["layers", "outputs"] | None = None
    allow_nonfinite: bool = False
    seed: int | None = None  # None: 0 for random inputs, and a factory's own inputs are used as given
    bench: bool = False
    bench_warmup: int = Field(default=3, ge=0)
    bench_iters: int = Field(default=30, ge=1)
    bench_stability: float = Field(default=0.10, gt=0, lt=1)
    bench_threads: int = Field(default=1, ge=1)
    latency_budget_ms: dict[str, float] = Field(default_factory=dict)
    timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if p not in PRECISION_NAMES]
        if bad:
            raise ValueError(f"unknown precision {bad[0]!r}; expected one of {', '.join(PRECISION_NAMES)}")
        if not value:
            raise ValueError("at least one precision is needed")
        return value

    @field_validator("passes")
    @classmethod
    def _known_passes(cls, value: list[str] | None) -> list[str] | None:
        """A misspelt pass is a config error at load, not an error in every case minutes later."""
        if value is None:
            return value
        from normfold.fusers.pipeline import resolve_passes

        try:
            return resolve_passes(value)
        except NormfoldError as e:
            raise ValueError(str(e)) from e

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: list[str]) -> list[str]:
        from normfold.runtime.registry import parse_backends

        try:
            return [b for b in parse_backends(value) if b != "torch"]
        except NormfoldError as e:
            raise ValueError(str(e)) from e


_SETTING_KEYS: tuple[str, ...] = tuple(CaseSettings.model_fields)


class ModelConfig(_Strict):
    """One ``[[models]]`` entry: what to check, plus any :class:`CaseSettings` key as an override."""

    name: str | None = None
    ref: str = Field(description="zoo:NAME, path/to/file.py:factory or package.module:factory (the eager reference)")
    weights: str | None = None
    onnx: str | None = None
    inputs: list[str] | None = None
    inputs_npz: str | None = None
    # Overrides of CaseSettings (None = inherit).
    backends: list[str] | None = None
    precisions: list[str] | None = None
    opset: int | None = Field(default=None, ge=7)
    exporter: Literal["dynamo", "torchscript"] | None = None
    optimize: bool | None = None
    passes: list[str] | None = None
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)
    outputs: dict[str, OutputTolerance] | None = None

    @field_validator("passes")
    @classmethod
    def _known_passes(cls, value: list[str] | None) -> list[str] | None:
        return CaseSettings._known_passes(value)

    per_layer: bool | None = None
    fail_on: Literal["layers", "outputs"] | None = None
    allow_nonfinite: bool | None = None
    seed: int | None = None
    bench: bool | None = None
    bench_warmup: int | None = Field(default=None, ge=0)
    bench_iters: int | None = Field(default=None, ge=1)
    bench_stability: float | None = Field(default=None, gt=0, lt=1)
    bench_threads: int | None = Field(default=None, ge=1)
    latency_budget_ms: dict[str, float] | None = None
    timeout_s: float | None = Field(default=None, gt=0)

    @property
    def display_name(self) -> str:
        return self.name or self.ref.removeprefix("zoo:").rsplit(":", 1)[-1]

    def settings(self, defaults: CaseSettings) -> CaseSettings:
        """The defaults with this model's non-None keys laid over them (validated again)."""
        merged = defaults.model_dump()
        for key in _SETTING_KEYS:
            value = getattr(self, key)
            if value is not None:
                merged[key] = value.model_dump() if isinstance(value, BaseModel) else value
        return CaseSettings.model_validate(merged)


class ReportPaths(_Strict):
    """Where to write reports; each is optional. CLI flags override these."""

    junit: str | None = None
    summary: str | None = None
    html: str | None = None
    json_path: str | None = Field(default=None, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class GateConfig(_Strict):
    """The whole gate: run settings, defaults, models, baselines and report paths."""

    jobs: int = Field(default=1, ge=1)
    executor: ExecutorName | None = None
    ray_address: str | None = None
    require: list[str] = Field(default_factory=list)
    baseline: str | None = None
    drift_factor: float = Field(default=2.0, gt=1.0)
    drift_floor: float = Field(default=0.1, ge=0)
    latency_regression: float = Field(default=0.10, ge=0)
    defaults: CaseSettings = Field(default_factory=CaseSettings)
    reports: ReportPaths = Field(default_factory=ReportPaths)
    models: list[ModelConfig] = Field(min_length=1)
    # Not file keys: where the config came from, and what relative paths in it are relative to.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<in-memory config>")
    _path: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    @property
    def path(self) -> Path | None:
        """The file the config was read from (None for an in-memory or built-in config)."""
        return self._path

    @field_validator("require")
    @classmethod
    def _known_required(cls, value: list[str]) -> list[str]:
        from normfold.runtime.registry import parse_backends

        if not value:
            return value
        try:
            return parse_backends(value)
        except NormfoldError as e:
            raise ValueError(str(e)) from e

    def resolve(self, path: str | None) -> Path | None:
        """``path`` relative to the config file's directory (absolute paths unchanged)."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def effective_executor(self) -> str:
        return self.executor or ("process" if self.jobs > 1 else "local")


# --------------------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _validation_message(error: ValidationError, source: str) -> str:
    """One line per problem, each naming the key path and the file."""
    lines = []
    for item in error.errors():
        loc = _format_loc(tuple(item.get("loc", ())))
        if item.get("type") == "extra_forbidden":
            lines.append(f"{source}: unknown key {loc!r} (check the spelling; see docs/gate.md for every key)")
        elif item.get("type") == "missing":
            lines.append(f"{source}: missing required key {loc!r}")
        else:
            msg = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
            lines.append(f"{source}: {loc}: {msg} (got {item.get('input')!r})")
    return "; ".join(lines)


def config_from_dict(
    data: dict[str, Any], *, source: str = "<in-memory config>", base_dir: Path | None = None
) -> GateConfig:
    """Validate a parsed config table; errors are :class:`ConfigError` naming each bad key and ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of gate settings, got {type(data).__name__}")
    try:
        config = GateConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_validation_message(e, source)) from e
    config._base_dir = (base_dir or Path.cwd()).resolve()
    config._source = source
    return config


def find_config(start: str | Path | None = None) -> Path:
    """``normfold.toml`` or a ``pyproject.toml`` with ``[tool.normfold]`` in ``start`` (default: cwd)."""
    directory = Path(start or Path.cwd())
    candidate = directory / "normfold.toml"
    if candidate.is_file():
        return candidate
    pyproject = directory / "pyproject.toml"
    if pyproject.is_file():
        try:
            with open(pyproject, "rb") as fh:
                if "normfold" in tomllib.load(fh).get("tool", {}):
                    return pyproject
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {pyproject}: {e}") from e
    raise ConfigError(
        f"no gate config found in {directory}: expected normfold.toml or [tool.normfold] in pyproject.toml "
        f"(or pass the config path: normfold gate path/to/normfold.toml)"
    )


def load_config(path: str | Path | None = None) -> GateConfig:
    """Read and validate the gate config at ``path`` (a file, a directory, or None for the cwd)."""
    p = Path(path) if path is not None else None
    if p is None or p.is_dir():
        p = find_config(p)
    if not p.is_file():
        raise ConfigError(f"gate config not found: {p}")
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e}") from e
    source = str(p)
    if p.name == "pyproject.toml":
        tool = data.get("tool", {})
        if "normfold" not in tool:
            raise ConfigError(f"{p} has no [tool.normfold] table; expected the gate config there")
        data = tool["normfold"]
        source = f"{p} [tool.normfold]"
    config = config_from_dict(data, source=source, base_dir=p.parent)
    config._path = p
    return config
