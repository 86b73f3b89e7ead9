"""FHE challenges, sans-IO: the validator's epoch machine and the miner's keyring.

Read beside specs/FheChallenge.tla: the methods are its actions (StartEpoch, Issue,
KeyUploaded, Sent, ResponseReceived, Timeout, Error, CloseEpoch on the validator;
AddKey, Evaluate on the miner) and the check functions at the bottom are its
invariants, under the same names.

A validator, each epoch:
1. ranks the mesh's validators by hotkey and walks the miners in an order drawn from
   (mesh id, epoch): miner i goes to validator i mod V, so every miner has exactly one
   challenger per epoch and every validator computes the same split;
2. for each miner assigned to it, one challenge at a time and at most
   `challenges_per_miner` per epoch: Issue -> (KeyUploaded, once per miner and key id)
   -> Sent(at) -> ResponseReceived(at) | Timeout | Error -> exactly one outcome;
3. closes the epoch once every issued challenge has its outcome, and gossips the scores
   of the miners it challenged (protocol/scoring.py, over each miner's window).

The machine never touches a clock or a socket. It returns effects; the shell uploads
keys, sends challenges, stores outcomes and gossips scores, and feeds back what
happened with the time it happened. Latency is the shell's `at` of the response minus
its `at` of the send: the miner's part, not the validator's encryption or decryption.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, Sequence, Union

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.scoring import WINDOW, MinerScore, Outcome, WindowEntry, score_window

# Honest results measured 0.948-0.988 against the clear quantized circuit (p_error 0.01
# lets a few PBS land off by one); garbage sits near 0. The argmax must agree as well.
DEFAULT_MIN_COSINE = 0.85
MAX_ITERATIONS = 4  # circuit runs per challenge (a load challenge); fhe.engine's default bound
# The miner's quota window: `max_challenges_per_epoch` per validator in any this many
# seconds of the miner's clock (validator epochs have no fixed length; a minute holds one).
DEFAULT_QUOTA_WINDOW_S = 60.0


# --- epoch plan: pure functions -----------------------------------------------------


def epoch_order(epoch: int, mesh_id: str, miners: Iterable[str]) -> list[str]:
    """The miners in this epoch's order: a shuffle any node can recompute.

    Sorting by sha256(mesh_id, epoch, hotkey) is a uniform shuffle that needs no
    particular PRNG, so a node in another language draws the same order.
    """
    def rank(miner: str) -> bytes:
        return hashlib.sha256(f"sealmesh/fhe/order\x00{mesh_id}\x00{epoch}\x00{miner}".encode()).digest()

    return sorted(set(miners), key=rank)


def assign_miners(epoch: int, mesh_id: str, miners: Iterable[str],
                  validators: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """validator -> its miners this epoch; validators are ranked by hotkey."""
    ranked = sorted(set(validators))
    if not ranked:
        raise LocalProtocolError("no validators to assign miners to")
    order = epoch_order(epoch, mesh_id, miners)
    return {v: tuple(order[rank::len(ranked)]) for rank, v in enumerate(ranked)}


def challenge_id(mesh_id: str, epoch: int, validator: str, miner: str, index: int) -> str:
    """Stable id of the index-th challenge (from 1) a validator sends a miner in an epoch."""
    text = f"sealmesh/fhe/challenge\x00{mesh_id}\x00{epoch}\x00{validator}\x00{miner}\x00{index}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def judge(argmax_agrees: bool, cosine: float, min_cosine: float) -> Outcome:
    """OK when the decrypted result picks the same class and lies close to the clear one."""
    if not isinstance(argmax_agrees, bool):
        raise LocalProtocolError(f"argmax_agrees must be a bool, got {argmax_agrees!r}")
    if not (isinstance(cosine, (int, float)) and math.isfinite(cosine) and -1.0 - 1e-9 <= cosine <= 1.0 + 1e-9):
        raise LocalProtocolError(f"cosine must lie in [-1, 1], got {cosine!r}")
    return Outcome.OK if argmax_agrees and cosine >= min_cosine else Outcome.WRONG


# Brainlock's streaming check (its validator, issue 13): the first 20 % of the chunks of a
# chained /compute must have arrived by 70 % of the total time; a miner that computes
# everything and then sends it all at once fails it. Recorded as an error outcome.
STREAM_EARLY_FRACTION = 0.2
STREAM_DEADLINE_FRACTION = 0.7
LATE_STREAM = "late_stream"


def streamed_in_time(arrivals: Sequence[float], total: float) -> bool:
    """Whether chunks arriving at `arrivals` (seconds from the send, in order) over a
    response of `total` seconds pass the subnet's check: the first ceil(20 %) of them
    (at least one) by 70 % of the total. No chunk at all fails."""
    if not arrivals:
        return False
    early = max(1, math.ceil(STREAM_EARLY_FRACTION * len(arrivals)))
    return arrivals[early - 1] <= STREAM_DEADLINE_FRACTION * total


# --- effects: what the shell must do --------------------------------------------------


@dataclass(frozen=True)
class UploadKey:
    """Upload this validator's evaluation keys `key_id` to `miner`, then KeyUploaded."""

    challenge_id: str
    miner: str
    model: str
    key_id: str


@dataclass(frozen=True)
class SendChallenge:
    """Encrypt an input drawn from `input_seed`, send it, then Sent(at) with the send time."""

    challenge_id: str
    epoch: int
    miner: str
    model: str
    key_id: str
    input_seed: int
    iterations: int  # run the circuit this many times on the input, return the last result
    timeout_s: float


@dataclass(frozen=True)
class ChallengeRecord:
    """One challenge's outcome: what node/history.py stores."""

    challenge_id: str
    epoch: int
    validator: str
    miner: str
    model: str
    issued_at: float
    outcome: Outcome
    latency_s: float | None = None  # OK and WRONG: response at - send at
    agreement: bool | None = None
    cosine: float | None = None
    error_reason: str | None = None  # ERROR: why; TIMEOUT: "deadline"

    def window_entry(self) -> WindowEntry:
        return WindowEntry(self.outcome, self.latency_s if self.outcome is Outcome.OK else None)


@dataclass(frozen=True)
class RecordOutcome:
    record: ChallengeRecord


@dataclass(frozen=True)
class GossipScore:
    """Gossip one ScoreReport per entry (protocol/challenge_messages.py)."""

    epoch: int
    validator: str
    scores: tuple[MinerScore, ...]


Effect = Union[UploadKey, SendChallenge, RecordOutcome, GossipScore]


# --- the validator's machine --------------------------------------------------------------


class EpochPhase(enum.Enum):
    IDLE = "idle"  # no epoch started yet
    OPEN = "open"
    CLOSED = "closed"


class ChallengePhase(enum.Enum):
    AWAITING_KEY = "awaiting_key"
    READY = "ready"  # the miner holds our key: send
    SENT = "sent"
    DECIDED = "decided"


IN_FLIGHT = frozenset({ChallengePhase.AWAITING_KEY, ChallengePhase.READY, ChallengePhase.SENT})

# The life of one challenge, as h11 writes its states: event -> (from phases, to phase).
# Issue creates a challenge in AWAITING_KEY, or READY when the miner already holds our key.
TRANSITIONS: dict[str, tuple[frozenset[ChallengePhase], ChallengePhase]] = {
    "KeyUploaded": (frozenset({ChallengePhase.AWAITING_KEY}), ChallengePhase.READY),
    "Sent": (frozenset({ChallengePhase.READY}), ChallengePhase.SENT),
    "ResponseReceived": (frozenset({ChallengePhase.SENT}), ChallengePhase.DECIDED),
    "Timeout": (frozenset({ChallengePhase.SENT}), ChallengePhase.DECIDED),
    "Error": (IN_FLIGHT, ChallengePhase.DECIDED),
}

UNKNOWN_KEY = "unknown_key"  # error reason: the miner lost our key; upload it again next time
TIMEOUT_REASON = "deadline"


@dataclass(frozen=True)
class ChallengeConfig:
    mesh_id: str
    challenges_per_miner: int = 2
    response_timeout_s: float = 300.0
    min_cosine: float = DEFAULT_MIN_COSINE
    iterations: int = 1

    def __post_init__(self) -> None:
        if self.challenges_per_miner < 1:
            raise LocalProtocolError("challenges_per_miner must be at least 1")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise LocalProtocolError(f"iterations must lie in 1..{MAX_ITERATIONS}")
        if not (math.isfinite(self.response_timeout_s) and self.response_timeout_s > 0):
            raise LocalProtocolError("response_timeout_s must be a positive number of seconds")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise LocalProtocolError("min_cosine must lie in [-1, 1]")


@dataclass
class Challenge:
    challenge_id: str
    epoch: int
    index: int  # 1..challenges_per_miner within (epoch, miner)
    miner: str
    model: str
    key_id: str
    input_seed: int
    issued_at: float
    phase: ChallengePhase
    sent_at: float | None = None
    deadline: float | None = None
    outcome: Outcome | None = None

    def clone(self) -> "Challenge":
        twin = object.__new__(Challenge)
        twin.__dict__.update(self.__dict__)  # every field is immutable
        return twin


class ChallengeMachine:
    """One validator's challenges, epoch after epoch. Events in, effects out."""

    def __init__(self, config: ChallengeConfig, validator: str,
                 windows: Mapping[str, Sequence[WindowEntry]] | None = None) -> None:
        self.config = config
        self.validator = validator
        self.phase = EpochPhase.IDLE
        self.epoch = -1
        self.assigned: tuple[str, ...] = ()
        # every validator's miners this epoch (assign_miners): the shell waits on the
        # others' ScoreReports by it, so there is one split, the machine's
        self.plan: dict[str, tuple[str, ...]] = {}
        self.models: dict[str, str] = {}  # miner -> the model it is challenged on this epoch
        self.key_ids: dict[str, str] = {}  # model -> our evaluation key id for it
        self.challenges: dict[str, Challenge] = {}  # this epoch's, by id
        self.issued: dict[str, int] = {}  # miner -> challenges issued this epoch
        self.uploaded: set[tuple[str, str]] = set()  # (miner, key id) the miner holds
        self.records: list[ChallengeRecord] = []  # this epoch's outcomes, in order
        self.windows: dict[str, deque[WindowEntry]] = {
            miner: deque(entries, maxlen=WINDOW) for miner, entries in (windows or {}).items()}

    # -- StartEpoch / CloseEpoch --

    def start_epoch(self, epoch: int, *, offers: Mapping[str, str], key_ids: Mapping[str, str],
                    validators: Collection[str], now: float) -> list[Effect]:
        """Open `epoch`. offers: miner -> model it serves that we hold keys for;
        key_ids: model -> our evaluation key id; validators: every validator of the mesh."""
        if self.phase is EpochPhase.OPEN:
            raise LocalProtocolError(f"epoch {self.epoch} is still open: CloseEpoch first")
        if epoch <= self.epoch:
            raise LocalProtocolError(f"epoch {epoch} is not after epoch {self.epoch}")
        if self.validator not in validators:
            raise LocalProtocolError(f"{self.validator} is not among the validators given")
        missing = {model for model in offers.values() if model not in key_ids}
        if missing:
            raise LocalProtocolError(f"no evaluation key id for models {sorted(missing)}")
        self.plan = assign_miners(epoch, self.config.mesh_id, offers, validators)
        mine = self.plan[self.validator]
        self.phase, self.epoch, self.assigned = EpochPhase.OPEN, epoch, mine
        self.models = {m: offers[m] for m in mine}
        self.key_ids = dict(key_ids)
        self.challenges, self.issued, self.records = {}, {m: 0 for m in mine}, []
        return []

    def close_epoch(self, *, now: float) -> list[Effect]:
        self._require_open()
        pending = [c.challenge_id for c in self.challenges.values() if c.phase in IN_FLIGHT]
        if pending:
            raise LocalProtocolError(f"{len(pending)} challenges still without an outcome: {pending[:3]}")
        self.phase = EpochPhase.CLOSED
        challenged = [m for m in self.assigned if self.issued[m] > 0]
        scores = tuple(score_window(m, list(self.windows.get(m, ()))) for m in challenged)
        return [GossipScore(self.epoch, self.validator, scores)] if scores else []

    # -- Issue / KeyUploaded / Sent --

    def can_issue(self, miner: str) -> bool:
        return (self.phase is EpochPhase.OPEN and miner in self.issued
                and self.issued[miner] < self.config.challenges_per_miner
                and self.in_flight(miner) is None)

    def issue(self, miner: str, *, input_seed: int, now: float) -> list[Effect]:
        self._require_open()
        if miner not in self.issued:
            raise LocalProtocolError(f"{miner} is not assigned to {self.validator} in epoch {self.epoch}")
        if self.issued[miner] >= self.config.challenges_per_miner:
            raise LocalProtocolError(f"{miner} already had its {self.config.challenges_per_miner} challenges")
        busy = self.in_flight(miner)
        if busy is not None:
            raise LocalProtocolError(f"{miner} still has challenge {busy.challenge_id} in flight")
        index = self.issued[miner] + 1
        model = self.models[miner]
        key_id = self.key_ids[model]
        cid = challenge_id(self.config.mesh_id, self.epoch, self.validator, miner, index)
        has_key = (miner, key_id) in self.uploaded
        challenge = Challenge(cid, self.epoch, index, miner, model, key_id, int(input_seed), float(now),
                              ChallengePhase.READY if has_key else ChallengePhase.AWAITING_KEY)
        self.challenges[cid] = challenge
        self.issued[miner] = index
        if has_key:
            return [self._send_effect(challenge)]
        return [UploadKey(cid, miner, model, key_id)]

    def key_uploaded(self, cid: str, *, now: float) -> list[Effect]:
        challenge = self._challenge(cid, "KeyUploaded")
        self.uploaded.add((challenge.miner, challenge.key_id))
        challenge.phase = TRANSITIONS["KeyUploaded"][1]
        return [self._send_effect(challenge)]

    def sent(self, cid: str, *, at: float) -> list[Effect]:
        challenge = self._challenge(cid, "Sent")
        challenge.phase = TRANSITIONS["Sent"][1]
        challenge.sent_at = float(at)
        challenge.deadline = float(at) + self.config.response_timeout_s
        return []

    # -- ResponseReceived / Timeout / Error: each decides the challenge, once --

    def response_received(self, cid: str, *, at: float, argmax_agrees: bool, cosine: float) -> list[Effect]:
        challenge = self._challenge(cid, "ResponseReceived")
        assert challenge.sent_at is not None and challenge.deadline is not None
        if at < challenge.sent_at:
            raise LocalProtocolError(f"response at {at} precedes the send at {challenge.sent_at}")
        outcome = judge(argmax_agrees, cosine, self.config.min_cosine)
        if at > challenge.deadline:  # the answer came, but too late to count
            return self._decide(challenge, Outcome.TIMEOUT, error_reason=TIMEOUT_REASON)
        return self._decide(challenge, outcome, latency_s=at - challenge.sent_at,
                            agreement=argmax_agrees, cosine=float(cosine))

    def timeout(self, cid: str, *, now: float) -> list[Effect]:
        challenge = self._challenge(cid, "Timeout")
        assert challenge.deadline is not None
        if now < challenge.deadline:
            raise LocalProtocolError(f"challenge {cid} has until {challenge.deadline}, it is {now}")
        return self._decide(challenge, Outcome.TIMEOUT, error_reason=TIMEOUT_REASON)

    def error(self, cid: str, *, reason: str, now: float) -> list[Effect]:
        """The exchange failed: key upload or send refused, stream broken, bad result."""
        challenge = self._challenge(cid, "Error")
        if not reason:
            raise LocalProtocolError("an error outcome needs a reason")
        if reason == UNKNOWN_KEY:
            self.uploaded.discard((challenge.miner, challenge.key_id))
        return self._decide(challenge, Outcome.ERROR, error_reason=reason)

    def expire(self, *, now: float) -> list[Effect]:
        """Timeout every sent challenge whose deadline has passed (the shell's timer)."""
        effects: list[Effect] = []
        for challenge in list(self.challenges.values()):
            if challenge.phase is ChallengePhase.SENT and challenge.deadline is not None and now >= challenge.deadline:
                effects += self.timeout(challenge.challenge_id, now=now)
        return effects

    # -- queries --

    def in_flight(self, miner: str) -> Challenge | None:
        for challenge in self.challenges.values():
            if challenge.miner == miner and challenge.phase in IN_FLIGHT:
                return challenge
        return None

    def clone(self) -> "ChallengeMachine":
        """An independent copy (immutable parts shared): for exhaustive exploration."""
        twin = object.__new__(ChallengeMachine)
        twin.__dict__.update(self.__dict__)
        twin.models, twin.key_ids, twin.issued = dict(self.models), dict(self.key_ids), dict(self.issued)
        twin.challenges = {cid: c.clone() for cid, c in self.challenges.items()}
        twin.uploaded, twin.records = set(self.uploaded), list(self.records)
        twin.windows = {m: deque(w, maxlen=WINDOW) for m, w in self.windows.items()}
        return twin

    def snapshot(self) -> tuple:
        """Everything that defines the state, hashable: for exhaustive exploration."""
        return (
            self.phase, self.epoch, self.assigned, tuple(sorted(self.models.items())),
            tuple(sorted(self.key_ids.items())),
            tuple(sorted((cid, c.index, c.miner, c.key_id, c.phase, c.sent_at, c.deadline, c.outcome)
                         for cid, c in self.challenges.items())),
            tuple(sorted(self.issued.items())), tuple(sorted(self.uploaded)),
            tuple(self.records),
            tuple(sorted((m, tuple(w)) for m, w in self.windows.items())),
        )

    # -- internals --

    def _send_effect(self, challenge: Challenge) -> SendChallenge:
        return SendChallenge(challenge.challenge_id, challenge.epoch, challenge.miner, challenge.model,
                             challenge.key_id, challenge.input_seed, self.config.iterations,
                             self.config.response_timeout_s)

    def _decide(self, challenge: Challenge, outcome: Outcome, *, latency_s: float | None = None,
                agreement: bool | None = None, cosine: float | None = None,
                error_reason: str | None = None) -> list[Effect]:
        challenge.phase = ChallengePhase.DECIDED  # every deciding event's target in TRANSITIONS
        challenge.outcome = outcome
        record = ChallengeRecord(challenge.challenge_id, challenge.epoch, self.validator, challenge.miner,
                                 challenge.model, challenge.issued_at, outcome, latency_s, agreement,
                                 cosine, error_reason)
        self.records.append(record)
        self.windows.setdefault(challenge.miner, deque(maxlen=WINDOW)).append(record.window_entry())
        return [RecordOutcome(record)]

    def _require_open(self) -> None:
        if self.phase is not EpochPhase.OPEN:
            raise LocalProtocolError(f"no epoch is open (phase {self.phase.value})")

    def _challenge(self, cid: str, event: str) -> Challenge:
        """The challenge `event` applies to, if TRANSITIONS allows it from its phase."""
        self._require_open()
        challenge = self.challenges.get(cid)
        if challenge is None:
            raise LocalProtocolError(f"no challenge {cid} in epoch {self.epoch}")
        allowed = TRANSITIONS[event][0]
        if challenge.phase not in allowed:
            raise LocalProtocolError(f"{event} on challenge {cid}: it is {challenge.phase.value}, "
                                     f"{event} needs {'/'.join(sorted(p.value for p in allowed))}")
        return challenge


# --- the miner's keyring -------------------------------------------------------------------


class KeyringError(RemoteProtocolError):
    reason = "keyring"


class KeyIdTaken(KeyringError):
    reason = "key_id_taken"


class UnknownKey(KeyringError):
    reason = UNKNOWN_KEY


class KeyNotOwned(KeyringError):
    reason = "foreign_key"  # the same label as fhe.engine.ForeignKey


class KeyModelMismatch(KeyringError):
    reason = "key_model_mismatch"


class TooManyChallenges(KeyringError):
    reason = "too_many_challenges"


class BadIterations(KeyringError):
    reason = "bad_iterations"


class TooManyIterations(BadIterations):
    reason = "too_many_iterations"


@dataclass(frozen=True)
class KeyBinding:
    owner: str  # the validator whose signed AddKey uploaded it
    model: str


@dataclass
class MinerKeyring:
    """Which evaluation keys a miner holds, whose they are, and how often each owner used them.

    A key runs only for the validator that uploaded it (KeysUsedOnlyByOwner): another
    validator naming it is refused, so nobody can spend a miner's time under someone
    else's key, and a miner's honest work is always attributable. Each validator gets at
    most `max_challenges_per_epoch` evaluations in any `window_s` seconds of the miner's
    own clock, of at most `max_iterations` circuit runs each (IterationsBounded), and at
    most `max_keys` keys are held (oldest goes first).

    The quota is counted on the miner's clock, never on the epoch a request names (issue
    13): the epoch is the requester's own field, and a count that reset whenever it rose
    let a validator buy a fresh quota with every request (and, by naming epoch 2**62,
    lock itself out of every normal epoch). A sliding window has no boundary to straddle
    either: no 2x burst at the turn of a window. In specs/FheChallenge.tla the epoch of
    Evaluate was always the mesh's, never the requester's: the window is that clock.

    fhe.engine.FheEngine checks ownership again when it runs; this keyring answers first,
    with the quota the engine does not know. Unlike the engine it binds a key id to one
    owner only: a second validator uploading the same bytes is refused.
    """

    max_challenges_per_epoch: int
    max_iterations: int = MAX_ITERATIONS
    max_keys: int = 64
    window_s: float = DEFAULT_QUOTA_WINDOW_S
    bindings: dict[str, KeyBinding] = field(default_factory=dict)  # key id -> binding, oldest first
    used_by: dict[str, set[str]] = field(default_factory=dict)  # key id -> validators it ran for
    # validator -> the miner-clock times of its counted evaluations within the window, oldest first
    evaluations: dict[str, deque[float]] = field(default_factory=dict)

    def check_owner(self, owner: str, key_id: str) -> None:
        """AddKey's refusal, asked before the miner stores ~40 MB of keys: `key_id` is
        bound to another validator (KeyIdTaken)."""
        bound = self.bindings.get(key_id)
        if bound is not None and bound.owner != owner:
            raise KeyIdTaken(f"key {key_id[:16]} already belongs to another validator")

    def add_key(self, owner: str, key_id: str, *, model: str) -> None:
        """AddKey: bind `key_id` (sha256 of the key bytes, checked by the caller) to `owner`."""
        self.check_owner(owner, key_id)
        bound = self.bindings.get(key_id)
        if bound is not None:
            return  # the same key again: idempotent
        self.bindings[key_id] = KeyBinding(owner, model)
        self.used_by[key_id] = set()
        while len(self.bindings) > self.max_keys:
            oldest = next(iter(self.bindings))
            del self.bindings[oldest]
            del self.used_by[oldest]

    def check_iterations(self, iterations: int, limit: int | None = None) -> None:
        """The iteration bound, judged after the request's signature (a signed refusal)."""
        limit = self.max_iterations if limit is None else limit
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise BadIterations(f"iterations must be at least 1, got {iterations!r}")
        if iterations > limit:
            raise TooManyIterations(f"{iterations} iterations asked, {limit} allowed")

    def evaluate(self, requester: str, key_id: str, *, model: str, now: float, iterations: int = 1,
                 max_iterations: int | None = None) -> KeyBinding:
        """Evaluate: may `requester` run `model` under `key_id` at the miner's time `now`
        (seconds)? Counts the run if so. `max_iterations`: a stricter or looser bound for
        this call (the HTTP route chains up to its own bound), else the keyring's."""
        self.check_iterations(iterations, max_iterations)
        binding = self.bindings.get(key_id)
        if binding is None:
            raise UnknownKey(f"no key {key_id[:16]} here: upload it with add_key first")
        if binding.owner != requester:
            raise KeyNotOwned(f"key {key_id[:16]} was uploaded by another validator")
        if binding.model != model:
            raise KeyModelMismatch(f"key {key_id[:16]} is for {binding.model}, not {model}")
        recent = self._recent(requester, now)
        if len(recent) >= self.max_challenges_per_epoch:
            wait = recent[0] + self.window_s - now
            raise TooManyChallenges(f"{len(recent)} challenges in the last {self.window_s:g} s already: "
                                    f"the limit; retry in {max(wait, 0.0):.0f} s")
        recent.append(float(now))
        self.used_by[key_id].add(requester)
        return binding

    def _recent(self, requester: str, now: float) -> deque[float]:
        """The requester's counted evaluations within (now - window_s, now]. One stamped
        after `now` (the miner's clock stepped back) stays counted: that errs toward refusing."""
        recent = self.evaluations.setdefault(requester, deque())
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        return recent

    def keep_only(self, held: Iterable[str]) -> None:
        """Keys the miner's engine evicted leave the keyring too, so their owner hears
        unknown_key and uploads again."""
        held = set(held)
        for key_id in [k for k in self.bindings if k not in held]:
            del self.bindings[key_id]
            self.used_by.pop(key_id, None)

    def forget_all(self) -> None:
        """A restart without persisted keys: validators learn it from UnknownKey."""
        self.bindings.clear()
        self.used_by.clear()

    def clone(self) -> "MinerKeyring":
        return MinerKeyring(self.max_challenges_per_epoch, self.max_iterations, self.max_keys, self.window_s,
                            dict(self.bindings), {k: set(users) for k, users in self.used_by.items()},
                            {v: deque(times) for v, times in self.evaluations.items()})

    def snapshot(self) -> tuple:
        return (tuple(self.bindings.items()), tuple(sorted((k, tuple(sorted(v))) for k, v in self.used_by.items())),
                tuple(sorted((v, tuple(times)) for v, times in self.evaluations.items())))


# --- invariants: the same names as in specs/FheChallenge.tla --------------------------------
# Each returns True when it holds. Exhaustive tests check them in every reachable state.


def TypeOK(machine: ChallengeMachine) -> bool:  # noqa: N802  (the spec's name)
    if not isinstance(machine.phase, EpochPhase):
        return False
    for challenge in machine.challenges.values():
        if not isinstance(challenge.phase, ChallengePhase):
            return False
        if (challenge.phase is ChallengePhase.DECIDED) != (challenge.outcome is not None):
            return False
        if challenge.phase is ChallengePhase.SENT and challenge.deadline is None:
            return False
        if challenge.miner not in machine.assigned or challenge.key_id != machine.key_ids.get(challenge.model):
            return False
    return all(len(w) <= WINDOW for w in machine.windows.values())


def ExactlyOneOutcome(machine: ChallengeMachine) -> bool:  # noqa: N802
    """Never two outcomes for a challenge; a decided one has one; a closed epoch has all."""
    counts: dict[str, int] = {}
    for record in machine.records:
        counts[record.challenge_id] = counts.get(record.challenge_id, 0) + 1
    if any(n > 1 for n in counts.values()):
        return False
    for cid, challenge in machine.challenges.items():
        decided = challenge.phase is ChallengePhase.DECIDED
        if decided != (counts.get(cid, 0) == 1):
            return False
        if machine.phase is EpochPhase.CLOSED and not decided:
            return False
    return set(counts) <= set(machine.challenges)


def KeysUsedOnlyByOwner(keyrings: Iterable[MinerKeyring],  # noqa: N802
                        machines: Iterable[ChallengeMachine] = ()) -> bool:
    """A miner ran a key only for its owner; a validator only ever sends under its own keys."""
    for ring in keyrings:
        for key_id, users in ring.used_by.items():
            if users - {ring.bindings[key_id].owner}:
                return False
    for machine in machines:
        if any(c.key_id not in machine.key_ids.values() for c in machine.challenges.values()):
            return False
    return True


def IterationsBounded(machines: Iterable[ChallengeMachine],  # noqa: N802
                      keyrings: Iterable[MinerKeyring] = ()) -> bool:
    """At most challenges_per_miner challenges per miner per epoch, on both sides, each of
    at most MAX_ITERATIONS circuit runs; one challenge in flight per miner."""
    for machine in machines:
        if not 1 <= machine.config.iterations <= MAX_ITERATIONS:
            return False
        limit = machine.config.challenges_per_miner
        if any(n > limit for n in machine.issued.values()):
            return False
        if len(machine.challenges) != sum(machine.issued.values()):
            return False
        in_flight: dict[str, int] = {}
        for challenge in machine.challenges.values():
            if challenge.phase in IN_FLIGHT:
                in_flight[challenge.miner] = in_flight.get(challenge.miner, 0) + 1
        if any(n > 1 for n in in_flight.values()):
            return False
    for ring in keyrings:
        if ring.max_iterations > MAX_ITERATIONS:
            return False
        if any(len(times) > ring.max_challenges_per_epoch for times in ring.evaluations.values()):
            return False
    return True


__all__ = [
    "BadIterations", "ChallengeConfig", "DEFAULT_QUOTA_WINDOW_S", "ChallengeMachine", "ChallengePhase", "ChallengeRecord",
    "Effect", "EpochPhase", "ExactlyOneOutcome", "GossipScore", "IterationsBounded", "KeyBinding", "LATE_STREAM",
    "KeyIdTaken", "KeyModelMismatch", "KeyNotOwned", "KeyringError", "KeysUsedOnlyByOwner",
    "MAX_ITERATIONS", "MinerKeyring", "Outcome", "RecordOutcome", "SendChallenge",
    "TIMEOUT_REASON", "TRANSITIONS", "streamed_in_time", "TooManyChallenges", "TooManyIterations", "TypeOK",
    "UNKNOWN_KEY", "UnknownKey", "UploadKey", "assign_miners", "challenge_id", "epoch_order",
    "judge",
]
