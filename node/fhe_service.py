"""What the miner and the validator's challenger share: settings, bundles, the exchange.

Settings live in DATA_DIR/fhe.json (written by `sealmesh testnet` or by hand; absent: the
defaults below), like rounds.json for training rounds, because node.toml holds only the
node's flat settings.

One exchange on FHE_PROTOCOL is one frame each way (protocol/challenge_messages.py):
the signed request and its payload (evaluation keys or an encrypted input), then the
miner's signed answer (KeyAdded, ChallengeResponse + encrypted result, or Refused).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from node.clock import now_ms
from node.mesh import Mesh, MeshRequestError
from node.progress import PhaseProgress
from protocol.challenge_messages import (FHE_PROTOCOL, MAX_RESPONSE_BYTES, Refused, StreamMessage, open_frame,
                                         seal_frame)
from protocol.epistula import EnvelopeVerifier, Signer
from protocol.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger("sealmesh.fhe")

FHE_CONFIG_FILE = "fhe.json"
REPORT_SECTION = "fhe"
BEHAVIOURS = ("honest", "garbage", "slow", "stale_chain")


class FheSettingsError(LocalProtocolError):
    reason = "fhe_settings"


@dataclass(frozen=True)
class FheConfig:
    """The FHE market's knobs for one node (miner and validator read the same file)."""

    model: str = "digits-cnn"
    bundle_dir: str | None = None  # None: DATA_DIR/fhe/bundle-<model>, compiled on first start
    # validator
    challenges_per_miner: int = 1  # per epoch
    response_timeout_s: float = 50.0  # the miner's part; below the mesh's 60 s stream limit
    iterations: int = 1
    offers_wait_s: float = 90.0  # how long an epoch waits for every miner's ModelOffer
    # miner
    serve: bool = True  # False: the miner idles (a test mesh that runs no FHE epochs)
    key_cache_bytes: int = 1 << 30  # all validators' keys together
    # One validator's share (issue 11 finding 9): its uploads evict only its own keys.
    max_keys_per_validator: int = 2
    validator_key_bytes: int | None = None  # None: max_keys_per_validator keys of the circuit
    max_concurrency: int = 1  # FHE runs at once (each uses every core it can get)
    max_pending: int = 8  # challenges queued or running; more are refused as "busy"
    max_challenges_per_epoch: int = 8  # per validator in any quota_window_s, on the miner's side
    quota_window_s: float = 60.0  # the miner's own clock: a requester's epoch field never resets it
    slow_delay_s: float = 8.0  # behaviour "slow": sleep this long before answering
    offer_interval_s: float = 2.0  # ModelOffer gossip period (rarer once validators used us)
    http_port: int | None = None  # sealmesh's signed frames over HTTP /add_key and /compute; None: off
    # The Brainlock subnet's own HTTP protocol (node/roles/brainlock_http.py); None: off
    brainlock_port: int | None = None
    brainlock_max_iterations: int = 10  # chained circuit runs per /compute (the subnet sends 5-10)
    uploads_per_signer: int = 1  # HTTP request bodies one validator may send at once (both servers)
    brainlock_min_stake: float = 0.0  # besides the validator role (the subnet asks 10k TAO of the chain)

    def __post_init__(self) -> None:
        if self.challenges_per_miner < 1 or self.iterations < 1 or self.max_concurrency < 1 or self.max_pending < 1:
            raise FheSettingsError("challenges_per_miner, iterations, max_concurrency and max_pending must be >= 1")
        for name in ("response_timeout_s", "offers_wait_s", "offer_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise FheSettingsError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_keys_per_validator < 1 or (self.validator_key_bytes is not None and self.validator_key_bytes < 1):
            raise FheSettingsError("max_keys_per_validator and validator_key_bytes must be >= 1")
        if not (math.isfinite(self.quota_window_s) and self.quota_window_s > 0):
            raise FheSettingsError(f"quota_window_s must be a positive number of seconds, got {self.quota_window_s!r}")
        if self.brainlock_max_iterations < 1 or self.uploads_per_signer < 1 or self.brainlock_min_stake < 0:
            raise FheSettingsError("brainlock_max_iterations and uploads_per_signer must be >= 1, "
                                   "brainlock_min_stake >= 0")
        if not (math.isfinite(self.slow_delay_s) and self.slow_delay_s >= 0):
            raise FheSettingsError("slow_delay_s must be >= 0")

    def bundle_path(self, data_dir: Path) -> Path:
        return Path(self.bundle_dir) if self.bundle_dir else Path(data_dir) / "fhe" / f"bundle-{self.model}"


def load_fhe_config(data_dir: Path) -> FheConfig:
    path = Path(data_dir) / FHE_CONFIG_FILE
    if not path.exists():
        return FheConfig()
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise FheSettingsError(f"{path}: not JSON ({exc})") from exc
    known = {f.name for f in fields(FheConfig)}
    unknown = set(doc) - known
    if unknown:
        raise FheSettingsError(f"{path}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return FheConfig(**doc)


def write_fhe_config(data_dir: Path, config: FheConfig) -> None:
    (Path(data_dir) / FHE_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def ensure_bundle(model: str, bundle_dir: Path) -> Any:
    """The bundle's manifest, compiling the zoo model with its defaults if it is absent.

    A bundle that is present but altered raises BundleHashMismatch: never recompile over it.
    """
    from fhe.bundle import MANIFEST_JSON, load_manifest

    bundle_dir = Path(bundle_dir)
    if (bundle_dir / MANIFEST_JSON).exists():
        manifest = load_manifest(bundle_dir)
        if manifest.model != model:
            raise FheSettingsError(f"{bundle_dir} holds {manifest.model}, not {model}")
        return manifest
    from fhe.compile import COMPILE_PHASES, compile_model  # torch and the compiler: only when compiling
    from fhe.zoo import get_model

    defaults = get_model(model).defaults
    log.info("phase=fhe-compile model=%s out=%s", model, bundle_dir)
    # Compile beside the target and rename: a crash leaves no half bundle, and of two
    # processes compiling at once the first rename wins and the other uses its bundle.
    scratch = bundle_dir.with_name(f"{bundle_dir.name}.compiling-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with PhaseProgress(f"fhe compile {model}", COMPILE_PHASES) as line:  # a line on a terminal only
        compile_model(model, scratch, n_bits=defaults.n_bits, rounding_threshold_bits=defaults.rounding_threshold_bits,
                      rounding_method=defaults.rounding_method, p_error=defaults.p_error, on_phase=line.enter)
    try:
        os.rename(scratch, bundle_dir)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    if not (bundle_dir / MANIFEST_JSON).exists():
        raise FheSettingsError(f"could not place the compiled bundle at {bundle_dir}")
    return ensure_bundle(model, bundle_dir)


def result_bytes_estimate(server_zip: Path) -> int:
    """About the size of one serialized encrypted result of this circuit (a garbage
    miner's answer has this shape): the raw LWE payload of every output gate."""
    with zipfile.ZipFile(server_zip) as archive:
        specs = json.loads(archive.read("client.specs.json"))
    total = 0
    for circuit in specs["circuits"]:
        for gate in circuit["outputs"]:
            raw = gate["rawInfo"]
            total += math.prod(raw["shape"]["dimensions"]) * raw["integerPrecision"] // 8
    return total


class ExchangeError(Exception):
    """One FHE exchange failed; `reason` is the label the challenge outcome records."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason, self.hint = reason, hint


async def exchange(mesh: Mesh, signer: Signer, verifier: EnvelopeVerifier, *, peer_id: str, peer_hotkey: str,
                   message: StreamMessage, payload: bytes, expect: tuple[type[StreamMessage], ...],
                   timeout_s: float) -> tuple[StreamMessage, bytes]:
    """Send one signed request to a miner; its verified answer (one of `expect`) and payload.

    A Refused answer, a broken stream or a bad answer raise ExchangeError with the label;
    no answer within `timeout_s` raises TimeoutError.
    """
    frame = seal_frame(signer, message, payload, now_ms=now_ms(), signed_for=peer_hotkey)
    try:
        raw = await mesh.request(peer_id, FHE_PROTOCOL, frame, max_response_bytes=MAX_RESPONSE_BYTES,
                                 timeout_s=timeout_s)
    except MeshRequestError as exc:
        raise ExchangeError("stream", str(exc)) from exc
    try:
        verified, answer_payload = open_frame(raw, verifier=verifier, now_ms=now_ms(), expect=(*expect, Refused))
    except RemoteProtocolError as exc:
        raise ExchangeError(exc.reason, exc.hint) from exc
    if verified.member.hotkey != peer_hotkey:
        raise ExchangeError("wrong_signer", f"answer signed by {verified.member.hotkey}, not {peer_hotkey}")
    answer = verified.message
    if isinstance(answer, Refused):
        raise ExchangeError(answer.reason, answer.hint)
    return answer, answer_payload  # type: ignore[return-value]


__all__ = [
    "BEHAVIOURS", "ExchangeError", "FHE_CONFIG_FILE", "FheConfig", "FheSettingsError", "REPORT_SECTION",
    "ensure_bundle", "exchange", "load_fhe_config", "result_bytes_estimate", "write_fhe_config",
]
