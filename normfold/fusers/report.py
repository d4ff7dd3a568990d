"""What :func:`normfold.fusers.optimize` did, as data: the CLI renders it, the library never prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from normfold.fusers.base import RuleEvent
from normfold.io import json_text
from normfold.numerics.metrics import TensorMetrics


@dataclass
class RuleSummary:
    """One rule: every candidate site it looked at, and what happened there."""

    rule: str
    events: list[RuleEvent] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.events)

    @property
    def applied(self) -> int:
        return sum(e.status == "applied" for e in self.events)

    @property
    def skipped(self) -> int:
        return sum(e.status == "skipped" for e in self.events)

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "matched": self.matched,
            "applied": self.applied,
            "skipped": self.skipped,
            "events": [e.to_dict() for e in self.events],
        }


@dataclass
class VerificationReport:
    """The ORT CPU before/after check: ``|after − before| ≤ atol + rtol·|before|`` on every output."""

    passed: bool
    atol: float
    rtol: float
    seed: int
    inputs: dict[str, list[int]]
    outputs: list[TensorMetrics] = field(default_factory=list)
    attempts: int = 1
    disabled: list[RuleEvent] = field(default_factory=list)
    error: str = ""

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "seed": self.seed,
            "inputs": self.inputs,
            "max_abs": self.max_abs,
            "outputs": [o.to_dict() for o in self.outputs],
            "attempts": self.attempts,
            "disabled": [e.to_dict() for e in self.disabled],
            "error": self.error,
        }


@dataclass
class OptimizeReport:
    """Per rule matched/applied/skipped (with reasons and node names), op histograms, initializer bytes,
    wall time per pass and the verification result."""

    source: str
    output: str | None
    passes: list[str]
    rules: dict[str, RuleSummary]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    initializer_bytes_before: int
    initializer_bytes_after: int
    pass_seconds: dict[str, float]
    total_seconds: float
    opset_before: int | None
    opset_after: int | None
    verification: VerificationReport | None = None
    target: str = "portable"

    @property
    def applied(self) -> int:
        return sum(r.applied for r in self.rules.values())

    def events(self, status: str | None = None) -> list[RuleEvent]:
        return [e for r in self.rules.values() for e in r.events if status is None or e.status == status]

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "output": self.output,
            "target": self.target,
            "passes": self.passes,
            "rules": {name: r.to_dict() for name, r in self.rules.items()},
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "initializer_bytes_before": self.initializer_bytes_before,
            "initializer_bytes_after": self.initializer_bytes_after,
            "pass_seconds": self.pass_seconds,
            "total_seconds": self.total_seconds,
            "opset_before": self.opset_before,
            "opset_after": self.opset_after,
            "verification": self.verification.to_dict() if self.verification else None,
        }

    def to_json(self) -> str:
        return json_text(self.to_dict())


def op_histogram(model: ir.Model) -> dict[str, int]:
    """``{op_type: count}`` over the main graph and its subgraphs (domain-qualified outside ONNX)."""
    counts = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.all_nodes()
    )
    return dict(sorted(counts.items()))


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def summarize(events: list[RuleEvent], passes: list[str]) -> dict[str, RuleSummary]:
    """Group events by rule, dropping repeats of the same site from later fixed-point iterations."""
    rules = {name: RuleSummary(name) for name in passes}
    seen: set[tuple[str, str, tuple[str, ...], str]] = set()
    for event in events:
        key = (event.rule, event.status, event.nodes, event.reason)
        if key in seen:
            continue
        seen.add(key)
        rules.setdefault(event.rule, RuleSummary(event.rule)).events.append(event)
    return rules
