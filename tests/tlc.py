"""TLC on the specs in specs/: which models to check, how to run TLC, what it said.

The jar is the pinned one that deps/fetch_tlc.py puts in .tools/tlc/ (`make tlc-jar`);
$TLA2TOOLS_JAR overrides it. tests/test_tlc.py runs the CI models in `make test`;
`make tlc` (python -m tests.tlc) runs every model, the full ones too, and prints TLC's
result line for each.

    python -m tests.tlc                 # every model
    python -m tests.tlc Head FheChallenge   # models whose name starts so
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
PINNED_JAR = ROOT / ".tools" / "tlc" / "tla2tools.jar"
PASSED = "Model checking completed. No error has been found."


@dataclass(frozen=True)
class Model:
    """One TLC run: a spec, its .cfg, constants replaced, and whether CI runs it."""
    name: str
    spec: str
    cfg: str
    overrides: dict[str, str] = field(default_factory=dict)
    ci: bool = True  # False: only under SEALMESH_SLOW=1 and `make tlc`
    why: str = ""
    # TLC's deadlock check: on for specs whose last state stutters (Done, Finished), so
    # a state where nothing is enabled is a bug; off (-deadlock) for the head, which
    # has no terminal stutter (a finished head simply stops).
    check_deadlock: bool = True


# CI models run in `make test` (a minute or two of CPU in all); the others need
# SEALMESH_SLOW=1 or `make tlc`. Each .cfg's header says what its bounds are.
MODELS = (
    Model("Head", "Head", "Head.cfg", why="tests/test_head_explore.py's TLC bound", check_deadlock=False),
    Model("Head-catchup", "Head", "Head.cfg", {"Faults": '{"byz_final"}', "MaxTx": "1"}, check_deadlock=False,
          why="b down for the round adopts it by quorum (AdoptByQuorum) while c claims any round (ByzFinal)"),
    Model("FheChallengeEpochs", "FheChallenge", "FheChallengeEpochs.cfg",
          why="tests/test_challenge_explore.py's second bound: 2 epochs x 1 challenge"),
    Model("FheChallenge-ci", "FheChallenge", "FheChallenge.cfg", {"Challenges": "1"},
          why="the explorer's first bound with 1 challenge per miner instead of 2"),
    Model("FheChallenge", "FheChallenge", "FheChallenge.cfg", ci=False,
          why="tests/test_challenge_explore.py's first bound: 1 epoch x 2 challenges, 1 restart"),
    Model("SecureAggregation-ci", "SecureAggregation", "SecureAggregation.cfg",
          {"Committee": "{c1}", "BadMembers": "{}"},
          why="the adversary and the blame step, with one committee member"),
    Model("SecureAggregation", "SecureAggregation", "SecureAggregation.cfg", ci=False,
          why="two members, c2 bad, the adversary and the blame step"),
    Model("Membership-ci", "Membership", "Membership.cfg", {"Validators": "{v1}"}, check_deadlock=False,
          why="specs/Membership.cfg: one founding member, one stranger (issue 15), one validator's views"),
    Model("Membership", "Membership", "Membership.cfg", ci=False, check_deadlock=False,
          why="specs/Membership.cfg: two validators whose round views may differ"),
    Model("SecureAggregationConformance", "SecureAggregation", "SecureAggregationConformance.cfg", ci=False,
          why="the bounds of tests/test_aggregation_conformance.py (which runs it in CI, dumping its graph)"),
)


@dataclass
class Result:
    model: Model
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return PASSED in self.output

    def _last(self, pattern: str) -> int | None:
        found = re.findall(pattern, self.output)
        return int(found[-1].replace(",", "")) if found else None

    @property
    def generated(self) -> int | None:
        return self._last(r"([\d,]+) states generated")

    @property
    def distinct(self) -> int | None:
        return self._last(r"([\d,]+) distinct states found")

    @property
    def depth(self) -> int | None:
        return self._last(r"depth of the complete state graph search is (\d+)")

    def line(self) -> str:
        verdict = "no error" if self.passed else "FAILED"
        return (f"TLC {self.model.name} ({self.model.cfg}{' ' + str(self.model.overrides) if self.model.overrides else ''}): "
                f"{verdict}, {self.generated} states generated, {self.distinct} distinct, depth {self.depth}, "
                f"{self.seconds:.0f} s")


def jar() -> Path | None:
    for candidate in (os.environ.get("TLA2TOOLS_JAR", ""), str(PINNED_JAR)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def missing() -> str | None:
    """Why TLC cannot run here, or None."""
    if shutil.which("java") is None:
        return "TLC needs java (Java 17 runs TLC 2.15)"
    if jar() is None:
        return f"TLC needs {PINNED_JAR.relative_to(ROOT)}: run `make tlc-jar` (deps/fetch_tlc.py)"
    return None


def cfg_text(model: Model) -> str:
    text = (SPECS / model.cfg).read_text()
    for name, value in model.overrides.items():
        text, count = re.subn(rf"(?m)^(\s+{name} = ).*$", lambda m: m.group(1) + value, text)
        if count != 1:
            raise ValueError(f"{model.cfg} sets {name} {count} times, expected once")
    return text


def run(model: Model, *, timeout_s: int = 600, workdir: Path | None = None,
        spec_text: str | None = None, cfg: str | None = None, extra: tuple[str, ...] = ()) -> Result:
    """TLC on a copy of the spec (spec_text and cfg replace the files: the mutation tests), one
    worker. Deadlock checking is switched by flag, -deadlock, never by a CHECK_DEADLOCK line:
    TLC 2.15 reads that as an invariant name."""
    path = jar()
    if path is None:
        raise RuntimeError(missing())
    with tempfile.TemporaryDirectory(prefix=f"tlc-{model.name}-") as tmp:
        work = workdir or Path(tmp)
        (work / f"{model.spec}.tla").write_text(spec_text or (SPECS / f"{model.spec}.tla").read_text())
        (work / "model.cfg").write_text(cfg or cfg_text(model))
        started = time.perf_counter()
        done = subprocess.run(
            ["java", "-XX:+UseParallelGC", "-cp", str(path), "tlc2.TLC", "-workers", "1",
             *(() if model.check_deadlock else ("-deadlock",)),
             "-lncheck", "final",  # liveness once, at the end: periodic checks cost more than the search
             "-metadir", str(work / "states"), *extra, "-config", "model.cfg", f"{model.spec}.tla"],
            cwd=work, capture_output=True, text=True, timeout=timeout_s)
        return Result(model, done.stdout + done.stderr, time.perf_counter() - started)


def main(argv: list[str]) -> int:
    why = missing()
    if why:
        print(f"tlc: {why}", file=sys.stderr)
        return 2
    chosen = [m for m in MODELS if not argv or any(m.name.startswith(a) for a in argv)]
    failed = 0
    for model in chosen:
        result = run(model)
        print(result.line(), flush=True)
        if not result.passed:
            failed += 1
            print(result.output[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
