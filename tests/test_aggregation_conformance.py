"""The Python aggregation machines and specs/SecureAggregation.tla agree, mechanically.

TLC dumps the spec's whole state graph under specs/SecureAggregationConformance.cfg
(-dump dot,actionlabels). The Python explorer (tests/test_aggregation_explore.py, a copy
of it configured to the same bounds) runs every interleaving of the real machines; each
machine event it takes (and each clock tick) is observed, both worlds are mapped to the
spec's variables (`spec_state`), and the check is:

- every world the explorer reaches is a state of the spec's graph (inclusion), its
  first world the spec's initial state;
- every event leaves the spec state unchanged (a stutter: work the spec does not model)
  or is a path of one to three spec steps (one event of Python is at times more than one
  action of the spec: CloseCollection publishes a set below the minimum at once, and a
  recomputed aggregate checks the partials buffered before it, ReceivePartial).

The mutation test runs the same check on a copy of the protocol/aggregation package with
one guard changed (a member no longer aborts when agreement has become impossible): the
explorer's invariants still hold, and the check names the states the spec never has.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
import time
import types
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import tlc

ROOT = Path(__file__).resolve().parent.parent
MODEL = tlc.Model("SecureAggregationConformance", "SecureAggregation", "SecureAggregationConformance.cfg")
# The bounds of the cfg above, for the Python explorer.
BOUNDS = dict(TRAINERS=("t1", "t2"), CHEATERS=frozenset(), VALIDATORS=("v1", "v2"), COMMITTEE=("c1",),
              BAD_MEMBERS=frozenset(), THRESHOLD=1, MIN_CONTRIBUTORS=2, ROUNDS=1)
MAX_PATH = 3


# --- TLA+ values as TLC prints them ---------------------------------------------------

@dataclass(frozen=True, order=True)
class MV:
    """A model value (t1, v1, NoSet): printed bare."""
    name: str


class Rec(dict):
    """A TLA+ record."""


def tla(value) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, MV):
        return value.name
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(tla(v) for v in sorted(value)) + "}"
    if isinstance(value, Rec):
        return "[" + ", ".join(f"{k} |-> {tla(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, dict):
        return "(" + " @@ ".join(f"{tla(k)} :> {tla(v)}" for k, v in sorted(value.items())) + ")"
    if isinstance(value, tuple):
        return "<<" + ", ".join(tla(v) for v in value) + ">>"
    raise TypeError(value)


def canonical(assignments: dict[str, str]) -> tuple:
    """TLC breaks and indents long values; no value here holds a space (strings are
    phase names), so whitespace is dropped."""
    return tuple(sorted((k, "".join(v.split())) for k, v in assignments.items()))


# --- the spec's graph, from TLC's dot dump --------------------------------------------

_NODE = re.compile(r'^(-?\d+) \[label="((?:[^"\\]|\\.)*)"(,style = filled)?\]', re.M)
_EDGE = re.compile(r'^(-?\d+) -> (-?\d+) \[label="(\w+)"', re.M)


def _unescape(label: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), label)


def _parse_label(text: str) -> dict[str, str]:
    out = {}
    for part in re.split(r"(?:^|\n)/\\ ", text):
        if part.strip():
            name, value = part.split(" = ", 1)
            out[name.strip()] = value
    return out


@dataclass
class SpecGraph:
    state_of: dict[str, tuple] = field(default_factory=dict)  # fingerprint -> canonical state
    node_of: dict[tuple, str] = field(default_factory=dict)
    succ: dict[str, dict[str, str]] = field(default_factory=dict)  # fp -> successor fp -> action
    initial: set[str] = field(default_factory=set)

    @classmethod
    def from_dot(cls, text: str) -> "SpecGraph":
        graph = cls()
        for fp, label, init in _NODE.findall(text):
            state = canonical(_parse_label(_unescape(label)))
            graph.state_of[fp], graph.node_of[state] = state, fp
            if init:
                graph.initial.add(fp)
        for a, b, action in _EDGE.findall(text):
            graph.succ.setdefault(a, {})[b] = action
        return graph

    def path(self, a: str, b: str) -> list[str] | None:
        """The actions of a shortest path a -> b of at most MAX_PATH steps."""
        frontier, seen = deque([(a, [])]), {a}
        while frontier:
            node, actions = frontier.popleft()
            if len(actions) == MAX_PATH:
                continue
            for nxt, action in self.succ.get(node, {}).items():
                if nxt == b:
                    return actions + [action]
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append((nxt, actions + [action]))
        return None


def spec_graph() -> SpecGraph:
    with tempfile.TemporaryDirectory(prefix="tlc-conformance-") as tmp:
        dot = Path(tmp) / "graph.dot"
        result = tlc.run(MODEL, extra=("-dump", "dot,actionlabels", str(dot)), timeout_s=300)
        assert result.passed, result.output[-3000:]
        return SpecGraph.from_dot(dot.read_text())


# --- the Python explorer at the cfg's bounds, and the mapping --------------------------

def configured_explorer(aggregation: types.ModuleType | None = None) -> types.ModuleType:
    """A private copy of tests/test_aggregation_explore.py with BOUNDS (and, for the
    mutation test, another aggregation module)."""
    path = ROOT / "tests" / "test_aggregation_explore.py"
    spec = importlib.util.spec_from_file_location("_aggregation_explore_conformance", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    for name, value in BOUNDS.items():
        setattr(module, name, value)
    if aggregation is not None:
        module.agg = aggregation
        module._CLASS_BY_KIND = {"validator": aggregation.ValidatorRound, "committee": aggregation.CommitteeRound,
                                 "trainer": aggregation.TrainerRound}
    agg = module.agg
    module.MESH = agg.MeshRounds(
        validators=module.VALIDATORS, committee=module.COMMITTEE, threshold=module.THRESHOLD,
        public_key_id=module.h("committee key"), key_bits=2048,
        policy=agg.RoundPolicy(min_contributors=module.MIN_CONTRIBUTORS, max_contributors=len(module.TRAINERS)))
    module.OPENER = agg.scheduled_opener(module.MESH, 1)
    module.NODES = module.VALIDATORS + module.COMMITTEE + module.TRAINERS
    return module


NO_SET = MV("NoSet")


def spec_state(ex: types.ModuleType, world) -> tuple:
    """The spec's variables for one Python world (SecureAggregation.tla's VARIABLES)."""
    agg = ex.agg
    v_ = {v: ex.view(world.nodes[v]) for v in ex.VALIDATORS}
    c_ = {c: ex.view(world.nodes[c]) for c in ex.COMMITTEE}
    t_ = {t: ex.view(world.nodes[t]) for t in ex.TRAINERS}

    def names(view) -> object:
        return NO_SET if view is None else frozenset(MV(t) for t in view.contributors)

    def status(m, t: str) -> str:
        if t in m.accepted:
            return "accepted"
        if t in m.rejected:
            return "rejected"
        return "pending" if t in m.pending else "none"

    def partial(m, c: str) -> str:
        if c in m.partials_valid:
            return "valid"
        if c in m.bad_partials:
            return "invalid"
        # a partial held before the aggregate is confirmed is buffered: not yet received in the spec
        return "pending" if c in m.partials and m.aggregate_confirmed else "none"

    def slot(m, t: str) -> str:
        if t in m.slot_verdicts:
            return "valid" if m.slot_verdicts[t] == "" else "invalid"
        return "pending" if t in m.slot_proofs else "none"

    opener = v_[ex.OPENER]
    honest_open = opener.phase is not agg.Phase.OPEN and opener.abort_reason != "never_opened"
    fn = lambda keys, f: {MV(k): f(k) for k in keys}  # noqa: E731
    state = {
        "round": world.round_id, "base": (),
        "clock": ("collect", "closed", "expired")[world.clock],
        "tPhase": fn(ex.TRAINERS, lambda t: t_[t].phase.value),
        "sent": frozenset(MV(t) for t in ex.TRAINERS if t_[t].blob_id),
        "vPhase": fn(ex.VALIDATORS, lambda v: v_[v].phase.value),
        "status": fn(ex.VALIDATORS, lambda v: fn(ex.TRAINERS, lambda t: status(v_[v], t))),
        "published": fn(ex.VALIDATORS, lambda v: names(v_[v].published)),
        "vSeen": fn(ex.VALIDATORS, lambda v: fn(ex.VALIDATORS, lambda w: names(v_[v].agreement.sets.get(w)))),
        "vAgreed": fn(ex.VALIDATORS, lambda v: names(v_[v].agreed)),
        "vConfirmed": frozenset(MV(v) for v in ex.VALIDATORS if v_[v].aggregate_confirmed),
        "partial": fn(ex.VALIDATORS, lambda v: fn(ex.COMMITTEE, lambda c: partial(v_[v], c))),
        "combining": frozenset(MV(v) for v in ex.VALIDATORS if v_[v].combining),
        "vAdapter": fn(ex.VALIDATORS, lambda v: (names(v_[v].agreed),) if v_[v].phase is agg.Phase.FINAL
                       else NO_SET),
        "cPhase": fn(ex.COMMITTEE, lambda c: c_[c].phase.value),
        "cSeen": fn(ex.COMMITTEE, lambda c: fn(ex.VALIDATORS, lambda w: names(
            c_[c].agreement.sets.get(w) if c_[c].agreement else None))),
        "cAgreed": fn(ex.COMMITTEE, lambda c: names(c_[c].agreed)),
        "cConfirmed": frozenset(MV(c) for c in ex.COMMITTEE if c_[c].aggregate_confirmed),
        "honestOpen": honest_open,
        "byzOpen": Rec({"from": MV(ex.OPENER), "min": 0}),  # NoOpen: the cfg has no adversary
        "cMin": fn(ex.COMMITTEE, lambda c: c_[c].round_open.min_contributors if c_[c].round_open else 0),
        "vBlame": frozenset(MV(v) for v in ex.VALIDATORS if v_[v].blame is not None),
        "slotProof": fn(ex.VALIDATORS, lambda v: fn(ex.TRAINERS, lambda t: slot(v_[v], t))),
        "named": fn(ex.VALIDATORS, lambda v: frozenset(MV(t) for t in v_[v].bad_contributors)),
    }
    return canonical({name: tla(value) for name, value in state.items()})


@dataclass
class Conformance:
    events: int = 0
    stutters: int = 0
    paths: Counter = field(default_factory=Counter)  # spec steps per event -> count
    actions: Counter = field(default_factory=Counter)  # spec actions of one-step events
    python_states: set = field(default_factory=set)
    outside: list = field(default_factory=list)  # (label, state) not in the spec's graph
    not_a_step: list = field(default_factory=list)  # (label, before, after)
    initial_ok: bool = False
    python_explored: int = 0
    seconds: float = 0.0

    @property
    def conforms(self) -> bool:
        return self.initial_ok and not self.outside and not self.not_a_step


def check(graph: SpecGraph, ex: types.ModuleType) -> Conformance:
    started = time.perf_counter()
    result = Conformance()
    mapped: dict[tuple, tuple] = {}

    def state(world) -> tuple:
        key = (world.round_id, world.clock, tuple(world.nodes[n] for n in ex.NODES))
        if key not in mapped:
            mapped[key] = spec_state(ex, world)
        return mapped[key]

    checked: set = set()

    class Observed(ex.Explorer):
        def observe(self, before, after, label):
            a, b = state(before), state(after)
            result.events += 1
            if (a, b) in checked:
                return
            checked.add((a, b))
            for s in (a, b):
                if s not in result.python_states:
                    result.python_states.add(s)
                    if s not in graph.node_of:
                        result.outside.append((label, s))
            if a == b:
                result.stutters += 1
                return
            if a not in graph.node_of or b not in graph.node_of:
                return
            steps = graph.path(graph.node_of[a], graph.node_of[b])
            if steps is None:
                result.not_a_step.append((label, a, b))
                return
            result.paths[len(steps)] += 1
            if len(steps) == 1:
                result.actions[steps[0]] += 1

    ex.Explorer = Observed
    start = ex.World.start(1, ex.h("genesis adapter"))
    result.initial_ok = graph.node_of.get(state(start)) in graph.initial
    explored = ex.explore(ex.Bounds(rounds=ex.ROUNDS))
    result.python_explored = explored["states"]
    result.seconds = time.perf_counter() - started
    return result


def difference(a: tuple, b: tuple) -> str:
    da, db = dict(a), dict(b)
    return "; ".join(f"{k}: {da[k]} -> {db[k]}" for k in da if da[k] != db[k])


def report(name: str, graph: SpecGraph, result: Conformance) -> str:
    return (f"conformance [{name}]: {result.python_explored} Python explorer states, "
            f"{len(result.python_states)} distinct spec states among them "
            f"(of {len(graph.state_of)} in the spec's graph), {result.events} events observed, "
            f"{sum(result.paths.values()) + result.stutters} distinct transitions: {result.stutters} stutters, "
            f"steps per event {dict(sorted(result.paths.items()))}; {len(result.outside)} states outside the spec, "
            f"{len(result.not_a_step)} transitions not a spec path; {result.seconds:.1f} s")


@pytest.fixture(scope="module")
def graph() -> SpecGraph:
    why = tlc.missing()
    if why:
        pytest.skip(why)
    return spec_graph()


def test_every_python_transition_is_a_step_of_the_spec(graph, capsys):
    result = check(graph, configured_explorer())
    with capsys.disabled():
        print("\n" + report("protocol/aggregation/", graph, result))
        print("  one-step events by spec action:", dict(sorted(result.actions.items())))
    assert result.initial_ok, "the explorer's first world is not the spec's initial state"
    assert not result.outside, [(label, s) for label, s in result.outside[:3]]
    assert not result.not_a_step, [(label, difference(a, b)) for label, a, b in result.not_a_step[:3]]
    # the check saw the protocol, not a corner of it: both ends, every kind of step
    assert result.python_explored > 500 and result.paths[1] > 1000
    assert {"OpenRound", "JoinRound", "Contribute", "ReceiveContribution", "VerifyContribution", "Tick",
            "CloseCollection", "ComputeAggregate", "ReceiveAcceptedSet", "ReleasePartial", "ReceivePartial",
            "VerifyPartial", "Finalize", "FinalDeadline"} <= set(result.actions)


# The mutant: CommitteeRound.receive_accepted_set keeps watching when no set can reach a
# quorum any more (the spec's CommitteeDecide aborts: Impossible(seen)). No invariant of
# the explorer notices; the spec has no such state.
GUARD = 'return self._abort("no_agreement") if agreement.impossible() else []'
MUTATED = "return []"


def mutant_aggregation() -> types.ModuleType:
    """A copy of the protocol/aggregation package, imported under another name, with GUARD
    changed in the one module that holds it (the package's own imports point at the copy)."""
    sources = {path.name: path.read_text() for path in sorted((ROOT / "protocol" / "aggregation").glob("*.py"))}
    assert sum(text.count(GUARD) for text in sources.values()) == 1, \
        "the guard the mutation test changes moved: update GUARD"
    name = "protocol._aggregation_mutant"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "_aggregation_mutant"
        folder.mkdir()
        for filename, text in sources.items():
            (folder / filename).write_text(text.replace(GUARD, MUTATED).replace("protocol.aggregation.", name + "."))
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its modules import each other, and dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        finally:
            for loaded in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
                del sys.modules[loaded]
    return module


def test_a_changed_guard_is_caught(graph, capsys):
    result = check(graph, configured_explorer(mutant_aggregation()))
    with capsys.disabled():
        print("\n" + report("mutant: a member ignores impossible agreement", graph, result))
        if result.outside:
            label, state = result.outside[0]
            print("  first state outside the spec, after", label, ":",
                  {k: v for k, v in state if k in ("cPhase", "cSeen", "published")})
    assert not result.conforms
    assert result.outside or result.not_a_step
