"""TLC model-checks every spec in specs/ (tests/tlc.py lists the models).

CI runs the models marked ci (reduced where the full bounds take minutes: the .cfg's
bounds with constants replaced, named in tests/tlc.py); SEALMESH_SLOW=1 (and `make tlc`)
runs the full ones too. Skips, saying why, where java or the pinned jar is missing
(`make tlc-jar` fetches it).
"""

import re

import pytest

from tests import tlc

CI = [m for m in tlc.MODELS if m.ci]
FULL = [m for m in tlc.MODELS if not m.ci]
CFG_KEYWORDS = {"CONSTANT", "CONSTANTS", "INIT", "NEXT", "SPECIFICATION", "INVARIANT", "INVARIANTS",
                "PROPERTY", "PROPERTIES", "SYMMETRY", "VIEW", "CONSTRAINT", "CONSTRAINTS",
                "ACTION_CONSTRAINT", "ACTION_CONSTRAINTS"}


def _check(model: tlc.Model, capsys) -> tlc.Result:
    why = tlc.missing()
    if why:
        pytest.skip(why)
    result = tlc.run(model)
    with capsys.disabled():
        print("\n" + result.line())
    assert result.passed, result.output[-4000:]
    assert result.distinct and result.distinct > 1000, "TLC explored almost nothing: check the bounds"
    assert result.depth and result.depth > 5
    return result


@pytest.mark.parametrize("model", CI, ids=[m.name for m in CI])
def test_tlc_finds_no_error(model, capsys):
    _check(model, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("model", FULL, ids=[m.name for m in FULL])
def test_tlc_finds_no_error_at_full_bounds(model, capsys):
    _check(model, capsys)


def test_every_spec_has_a_ci_model():
    specs = {p.stem for p in tlc.SPECS.glob("*.tla")}
    assert specs == {m.spec for m in CI}, "a spec in specs/ that CI never model-checks (add it to tests/tlc.py)"


@pytest.mark.parametrize("cfg", sorted(tlc.SPECS.glob("*.cfg")), ids=lambda p: p.name)
def test_cfg_is_one_tlc_reads(cfg):
    """TLC 2.15 reads CHECK_DEADLOCK as an invariant name (tests/tlc.py passes -deadlock);
    every cfg is used by a model."""
    text = cfg.read_text()
    keywords = {line.split()[0] for line in (raw.split("\\*")[0].strip() for raw in text.splitlines())
                if line and line.split()[0].isupper() and line.split()[0] not in {"NoSet"}}
    assert "CHECK_DEADLOCK" not in keywords
    assert keywords <= CFG_KEYWORDS | set(re.findall(r"^\s+(\w+) =", text, re.M)), keywords - CFG_KEYWORDS
    assert cfg.name in {m.cfg for m in tlc.MODELS}, f"{cfg.name} is checked by no model in tests/tlc.py"


# --- the checks bite: a spec with a guard or a fairness condition removed fails ----------

def _mutant(model: tlc.Model, old: str, new: str, cfg: str | None = None) -> tlc.Result:
    why = tlc.missing()
    if why:
        pytest.skip(why)
    spec = (tlc.SPECS / f"{model.spec}.tla").read_text()
    assert spec.count(old) == 1, f"the text the mutation changes moved: {old!r}"
    return tlc.run(model, spec_text=spec.replace(old, new), cfg=cfg, timeout_s=300)


def test_tlc_catches_the_round_open_acceptance_rule_of_before_issue_11():
    """Acceptable(m) == TRUE (any validator's RoundOpen, any minimum): a member joins the
    adversary's minimum-1 round (SecureAggregation.md)."""
    model = next(m for m in tlc.MODELS if m.name == "SecureAggregation-ci")
    result = _mutant(model, "Acceptable(m) == m.from = Opener /\\ m.min = MeshMinContributors",
                     "Acceptable(m) == TRUE")
    assert not result.passed
    assert "Invariant JoinedOnlyMeshRounds is violated" in result.output, result.output[-3000:]


def test_tlc_catches_a_round_that_never_ends_without_a_fair_clock():
    """Without weak fairness on Tick the clock may stop before the deadline: a round can
    stay open forever, and AllRoundsEnd fails (the conformance bounds: a few seconds)."""
    model = next(m for m in tlc.MODELS if m.name == "SecureAggregationConformance")
    cfg = tlc.cfg_text(model).replace("SPECIFICATION Spec", "SPECIFICATION FairSpec") + "\nPROPERTIES\n    AllRoundsEnd\n"
    passing = tlc.run(model, cfg=cfg, timeout_s=300)
    assert passing.passed, passing.output[-3000:]
    result = _mutant(model, "    /\\ WF_vars(Tick)\n", "", cfg=cfg)
    assert not result.passed
    assert "Temporal properties were violated" in result.output, result.output[-3000:]


def test_tlc_catches_a_slash_that_only_its_authors_round_named():
    """Slash(h, r) enabled by one validator's view (the author's) instead of every one's:
    a member is slashed on a round another validator's view does not name (a few seconds)."""
    model = next(m for m in tlc.MODELS if m.name == "Membership")
    result = _mutant(model, "    /\\ \\A v \\in Validators : <<h, r>> \\in named[v]\n",
                     "    /\\ \\E v \\in Validators : <<h, r>> \\in named[v]\n")
    assert not result.passed
    assert "Invariant SlashOnlyOnEvidence is violated" in result.output, result.output[-3000:]


def test_tlc_catches_a_round_adopted_on_one_validators_word():
    """AdoptByQuorum with a quorum of one: b, down for the round, takes byzantine c's
    RoundFinal of a round that never happened as its view (issue 11 finding 2 again);
    TypeOK's observed[p] \\subseteq happened says so first, within a few states."""
    model = next(m for m in tlc.MODELS if m.name == "Head-catchup")
    result = _mutant(model, "Cardinality(Claimed(r) \\ {p}) >= N \\div 2 + 1",
                     "Cardinality(Claimed(r) \\ {p}) >= 1")
    assert not result.passed
    assert "Invariant TypeOK is violated" in result.output, result.output[-3000:]
