"""normfold.gate: one config, many models, one verdict (the CI numerics gate)."""

from normfold.gate.baseline import Baseline, apply_baseline, load_baseline, update_baseline
from normfold.gate.cases import CaseResult, CaseSpec, run_case
from normfold.gate.config import CaseSettings, GateConfig, ModelConfig, config_from_dict, find_config, load_config
from normfold.gate.executors import run_cases
from normfold.gate.records import BaselineEntry, CaseLatency, OptimizeSummary
from normfold.gate.report import GateReport, write_json
from normfold.gate.runner import plan_cases, run_gate

__all__ = [
    "Baseline",
    "BaselineEntry",
    "CaseLatency",
    "CaseResult",
    "CaseSettings",
    "CaseSpec",
    "GateConfig",
    "GateReport",
    "ModelConfig",
    "OptimizeSummary",
    "apply_baseline",
    "config_from_dict",
    "find_config",
    "load_baseline",
    "load_config",
    "plan_cases",
    "run_case",
    "run_cases",
    "run_gate",
    "update_baseline",
    "write_json",
]
