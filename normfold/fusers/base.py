"""The contract every normfold graph pass follows, and the one driver for rewrite rules.

A pass is a small :class:`onnx_ir.passes.InPlacePass` subclass (:class:`NormfoldPass`). For every place
it *could* rewrite it records one :class:`RuleEvent`: ``applied`` (naming the nodes it replaced) or
``skipped`` with a human reason (``"pads are non-zero: folding BN into the conv input is not exact at the
borders"``). A non-match that is not even a candidate records nothing. ``call`` returns
``PassResult(model, modified)`` where ``modified`` is exact, because the pipeline's early stop relies on it.

Most passes are one :class:`Rule` run by :class:`RulePass`, in onnxscript's rewriter vocabulary:

* ``match(facts, node) -> Site | Reject | None``: is the anchor node the start of a candidate? ``None``
  for "not a candidate"; a matcher that can only tell a look-alike apart while matching (the hand-written
  norms) returns the :class:`Reject` at once;
* ``check(site) -> Reject | None``: why this candidate must not be rewritten — a reason, never an
  exception (constant weights, shared initializers, channel counts, overflow);
* ``rewrite(scope, site) -> list[ir.Node]``: emit the replacement. Everything it needs is in the
  :class:`Site`; nothing travels from ``check`` to ``rewrite`` through ``self``.

:class:`RulePass` walks the rule's anchor ops in the main graph, its If/Loop/Scan bodies and every
model-local function, drops sites that verification disabled (one reason, :data:`DISABLED_REASON`),
records each site's event, and handles rules that need a newer opset (skip with the reason, or raise
the model's opset once when ``ctx.target_opset`` asks for it). Adding a rule is writing one class and
decorating it with :func:`register_rule`; it is then a pass of the same name in :data:`PASS_REGISTRY`.

Every node a pass creates carries provenance (:func:`normfold.exporter.provenance.set_module_path`):
a Conv that absorbed a BatchNorm produces the BN module's output, so it points at the BN's module.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, TypeVar

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers._facts import GraphFacts
from normfold.fusers._opset import opset_plan, raise_opset

EventStatus = Literal["applied", "skipped"]

#: The one reason recorded for a site that verification disabled (see the pipeline's bisection).
DISABLED_REASON = "disabled after failing verification"


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
    """Base class: subclasses set ``name`` and implement :meth:`run`, returning whether they changed the model.

    ``requires`` snapshots the graph's output names and ``ensures`` checks they survived: a rewrite
    replaces the producer of an output, never the output's public name.
    """

    name: ClassVar[str]

    def __init__(self, ctx: PassContext | None = None) -> None:
        super().__init__()
        self.ctx = ctx if ctx is not None else PassContext()
        self._output_names: list[str | None] = []

    def __repr__(self) -> str:
        return self.name

    def requires(self, model: ir.Model) -> None:
        self._output_names = [v.name for v in model.graph.outputs]

    def ensures(self, model: ir.Model) -> None:
        after = [v.name for v in model.graph.outputs]
        if after != self._output_names:
            raise ir.passes.PostconditionError(
                f"pass {self.name!r} renamed graph outputs {self._output_names} to {after}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = self.run(model)
        return ir.passes.PassResult(model, modified)

    @abc.abstractmethod
    def run(self, model: ir.Model) -> bool:
        """Rewrite ``model`` in place; return True exactly when something changed."""

    def site_disabled(self, anchor: str) -> bool:
        """True when verification disabled this rule at the node named ``anchor`` (see the pipeline)."""
        return (self.name, anchor) in self.ctx.disabled_sites

    def applied(self, nodes: Sequence[ir.Node], detail: str = "") -> None:
        self._record("applied", nodes, detail)

    def skipped(self, nodes: Sequence[ir.Node], reason: str) -> None:
        self._record("skipped", nodes, reason)

    def _record(self, status: EventStatus, nodes: Sequence[ir.Node], reason: str) -> None:
        self.ctx.events.append(RuleEvent(self.name, status, tuple(n.name or "" for n in nodes), reason))


@dataclass(frozen=True)
class Reject:
    """A candidate that must not be rewritten: the nodes the report names and the reason."""

    nodes: tuple[ir.Node, ...]
    reason: str


@dataclass(frozen=True, eq=False)
class Site:
    """A candidate a rule may rewrite: the nodes it replaces (the report names them, in graph order) and
    the node verification disables it by. Rules subclass it with what their rewrite needs."""

    nodes: tuple[ir.Node, ...]
    anchor: ir.Node


class Scope:
    """One graph a :class:`RulePass` visits (the main graph, an If/Loop/Scan body or a function body),
    with the model-wide facts and fresh names a rewrite needs."""

    def __init__(self, model: ir.Model, graph: ir.Graph, facts: GraphFacts, *, in_function: bool) -> None:
        self.model = model
        self.graph = graph
        self.facts = facts
        self.in_function = in_function
        self._names: g.Names | None = None

    @property
    def names(self) -> g.Names:
        """Fresh value/node names, collected on first use (one model scan per pass run, not per site)."""
        if self._names is None:
            self._names = g.Names(self.model)
        return self._names

    def constant(self, array: np.ndarray, base: str) -> ir.Value:
        """``array`` as a new constant named after ``base``: an initializer, or a ``Constant`` node at the
        top of a function body (functions have no initializers). Never an existing initializer."""
        name = self.names.fresh(base)
        tensor = ir.Tensor(np.ascontiguousarray(array), name=name)  # ir.tensor()'s protocol checks cost ~2 ms
        if not self.in_function:
            value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
            self.graph.register_initializer(value)
            return value
        node = ir.node("Constant", [], attributes={"value": tensor}, name=self.names.fresh(f"{name}_Constant"))
        node.outputs[0].name, node.outputs[0].const_value = name, tensor
        node.outputs[0].type, node.outputs[0].shape = ir.TensorType(tensor.dtype), tensor.shape
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(first, node)
        return node.outputs[0]


S = TypeVar("S", bound=Site)


class Rule(abc.ABC, Generic[S]):
    """One rewrite: ``match`` a candidate at an anchor node, ``check`` it, ``rewrite`` it (module docstring).

    ``opset`` names the default-domain opset the emitted op needs and its label for the skip reason;
    ``prime_facts`` asks for shape inference before the first rewrite of a pass run (rules whose matcher
    reads inferred shapes, since a newer op emitted before the opset is raised breaks inference).
    """

    name: ClassVar[str]
    anchors: ClassVar[tuple[str, ...]]
    opset: ClassVar[tuple[int, str] | None] = None
    prime_facts: ClassVar[bool] = False

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx  # options (allow_weight_copies); never state between check and rewrite

    @abc.abstractmethod
    def match(self, facts: GraphFacts, node: ir.Node) -> S | Reject | None:
        """The candidate anchored at ``node``, a look-alike's :class:`Reject`, or None (no candidate)."""

    def check(self, site: S) -> Reject | None:
        """Why ``site`` must not be rewritten, or None when it may be."""
        del site
        return None

    @abc.abstractmethod
    def rewrite(self, scope: Scope, site: S) -> list[ir.Node]:
        """Replace ``site`` in ``scope.graph``; returns the nodes created."""

    def describe(self, site: S, created: list[ir.Node]) -> str:
        """The ``applied`` event's detail (called after :meth:`rewrite`)."""
        del site, created
        return ""


class RulePass(NormfoldPass, Generic[S]):
    """Runs one :class:`Rule` over every graph of the model (module docstring); ``modified`` is exact."""

    def __init__(self, rule: type[Rule[S]], ctx: PassContext | None = None) -> None:
        super().__init__(ctx)
        self.rule: Rule[S] = rule(self.ctx)
        self.name = rule.name  # type: ignore[misc]  # one RulePass class serves every rule's name
        self._emitted = False  # set by each run, read by ensures()

    def requires(self, model: ir.Model) -> None:
        unversioned = self.rule.opset is not None and g.declared_opset(model) is None
        if unversioned and any(n.domain in ("", "ai.onnx") for n in model.graph):
            raise ir.passes.PreconditionError(
                f"rule {self.name!r} emits new default-domain ops, but the model uses default-domain ops "
                "without importing the default-domain opset"
            )
        super().requires(model)

    def ensures(self, model: ir.Model) -> None:
        super().ensures(model)
        need = self.rule.opset
        if need is not None and self._emitted and g.opset_of(model) < need[0]:
            raise ir.passes.PostconditionError(
                f"rule {self.name!r} emitted {need[1]} into an opset-{g.opset_of(model)} model"
            )

    def run(self, model: ir.Model) -> bool:
        raise_to, blocked = None, None
        if self.rule.opset is not None:
            raise_to, blocked = opset_plan(model, self.ctx.target_opset, *self.rule.opset)
        facts = GraphFacts(model)
        scopes = [Scope(model, graph, facts, in_function=False) for graph in model.graphs()]
        for function in model.functions.values():
            for graph in (function.graph, *function.graph.subgraphs()):
                scopes.append(Scope(model, graph, facts, in_function=True))
        rewrites, created = 0, list[ir.Node]()
        for scope in scopes:
            count, nodes = self._visit(scope, blocked)
            rewrites += count
            created.extend(nodes)
        if rewrites and raise_to is not None:
            raise_opset(model, raise_to, exclude=created)
        self._emitted = rewrites > 0
        return self._emitted

    def _visit(self, scope: Scope, blocked: str | None) -> tuple[int, list[ir.Node]]:
        """Rewrite every accepted site of one graph; returns how many, and the nodes they created."""
        rule, graph = self.rule, scope.graph
        anchors = [n for n in graph if n.op_type in rule.anchors and n.domain in ("", "ai.onnx")]
        if anchors and rule.prime_facts:
            scope.facts.prime()
        rewrites, created = 0, list[ir.Node]()
        for node in anchors:
            if node.graph is not graph:
                continue  # removed by an earlier rewrite of this run
            found = rule.match(scope.facts, node)
            if found is None:
                continue
            verdict = found if isinstance(found, Reject) else self._verdict(found, blocked)
            if verdict is not None:
                self.skipped(verdict.nodes, verdict.reason)
            elif not isinstance(found, Reject):
                new = rule.rewrite(scope, found)
                self.applied(found.nodes, rule.describe(found, new))
                rewrites += 1
                created.extend(new)
        return rewrites, created

    def _verdict(self, site: S, blocked: str | None) -> Reject | None:
        """Disabled by verification, refused by the rule's check, or blocked by the opset — in that order."""
        if self.site_disabled(site.anchor.name or ""):
            return Reject(site.nodes, DISABLED_REASON)
        return self.rule.check(site) or (Reject(site.nodes, blocked) if blocked else None)


PassFactory = Callable[[PassContext], NormfoldPass]

#: Every selectable pass by name: a :class:`NormfoldPass` subclass or a rule's :class:`RulePass` factory.
PASS_REGISTRY: dict[str, PassFactory] = {}


def register_pass(cls: type[NormfoldPass]) -> type[NormfoldPass]:
    """Class decorator: make a pass selectable by ``--passes NAME`` (names are unique)."""
    _register(cls.name, cls)
    return cls


R = TypeVar("R", bound=type[Rule])


def register_rule(cls: R) -> R:
    """Class decorator: run the rule as the pass ``cls.name`` (a :class:`RulePass`)."""
    _register(cls.name, functools.partial(RulePass, cls))
    return cls


def _register(name: str, factory: PassFactory) -> None:
    if name in PASS_REGISTRY:
        raise ValueError(f"pass {name!r} registered twice")
    PASS_REGISTRY[name] = factory
