"""The contract every normfold graph pass follows.

A pass is a small :class:`onnx_ir.passes.InPlacePass` subclass. It walks the model, and for every place
it *could* rewrite it records one :class:`RuleEvent`: ``applied`` (naming the nodes it replaced) or
``skipped`` with a human reason (``"pads are non-zero: folding BN into the conv input is not exact at the
borders"``). A non-match that is not even a candidate records nothing. ``call`` returns
``PassResult(model, modified)`` where ``modified`` is exact, because the pipeline's early stop relies on it.

Every node a pass creates carries provenance (:func:`normfold.exporter.provenance.set_module_path`):
a Conv that absorbed a BatchNorm produces the BN module's output, so it points at the BN's module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import onnx_ir as ir

EventStatus = Literal["applied", "skipped"]


@dataclass(frozen=True)
class RuleEvent:
    """One candidate site of one rule: what happened there and why."""

    rule: str
    status: EventStatus
    nodes: tuple[str, ...]
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "status": self.status, "nodes": list(self.nodes), "reason": self.reason}


@dataclass
class PassContext:
    """Options shared by all passes of one pipeline run, and the event log they append to."""

    target_opset: int | None = None
    allow_weight_copies: bool = False
    target: str = "portable"  # the runtime that will serve the model (normfold.fusers.lowering.TARGETS)
    disabled_sites: set[tuple[str, str]] = field(default_factory=set)
    events: list[RuleEvent] = field(default_factory=list)


class NormfoldPass(ir.passes.InPlacePass, abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`run`, returning whether they changed the model."""

    name: ClassVar[str]

    def __init__(self, ctx: PassContext | None = None) -> None:
        super().__init__()
        self.ctx = ctx if ctx is not None else PassContext()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = self.run(model)
        return ir.passes.PassResult(model, modified)

    @abc.abstractmethod
    def run(self, model: ir.Model) -> bool:
        """Rewrite ``model`` in place; return True exactly when something changed."""

    def site_disabled(self, anchor: str) -> bool:
        """True when verification disabled this rule at the node named ``anchor`` (see the pipeline)."""
        return (self.name, anchor) in self.ctx.disabled_sites

    def applied(self, nodes: list[ir.Node] | tuple[ir.Node, ...], detail: str = "") -> None:
        self.ctx.events.append(RuleEvent(self.name, "applied", tuple(n.name or "" for n in nodes), detail))

    def skipped(self, nodes: list[ir.Node] | tuple[ir.Node, ...], reason: str) -> None:
        self.ctx.events.append(RuleEvent(self.name, "skipped", tuple(n.name or "" for n in nodes), reason))


PASS_REGISTRY: dict[str, type[NormfoldPass]] = {}


def register_pass(cls: type[NormfoldPass]) -> type[NormfoldPass]:
    """Class decorator: make a pass selectable by ``--passes NAME`` (names are unique)."""
    if cls.name in PASS_REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls
