"""One frozen settings object per node, built from node.toml and command-line flags.

This is the only module that reads configuration; everything else is handed a
NodeSettings. Precedence: command line > config file > defaults.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from node.wallet import DEFAULT_WALLET_PATH
from protocol.epistula import DEFAULT_WINDOW_MS
from protocol.membership import Role


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class NodeSettings:
    role: Role
    data_dir: Path = Path("~/.sealmesh/node")
    wallet_name: str = "default"
    hotkey: str = "default"
    wallet_path: Path = DEFAULT_WALLET_PATH
    genesis: Path | None = None  # local mesh registry; or network+netuid for Bittensor
    network: str | None = None
    netuid: int | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    bootstrap: tuple[str, ...] = ()
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0 = pick a free port; the chosen one is written to DATA_DIR/ready.json
    epistula_window_ms: int = DEFAULT_WINDOW_MS
    invalid_message_limit: int = 20
    announce_interval_s: float = 1.0
    pings: int = 0  # scenario: pings each node sends once it has heard every member
    ping_interval_s: float = 0.1
    ping_start: str = "heard_all"  # or "signal": wait for SIGUSR1 (used by sealmesh testnet)
    log_level: str = "INFO"
    # Where blobs live: "local" (DATA_DIR/blobs), "s3://bucket/prefix?endpoint=URL", "storj".
    storage: str = "local"
    # Settlement backend: "embedded" (the validators' own head, SQLite) or "hydra".
    settlement: str = "embedded"
    hydra_url: str | None = None  # ws://host:4001 of the hydra-node this validator drives
    # Embedded head: how long a closed head waits for contests before fanout (testnet: seconds).
    contestation_period_s: float = 600.0
    db: str | None = None  # validator history; default sqlite:///DATA_DIR/history.sqlite
    model: Path | None = None  # base model directory (Hugging Face layout); None: built-in tiny model
    # Addresses others dial to reach this node (listening on 0.0.0.0, or behind a forwarded
    # port); empty: the listen address, when it is not a wildcard.
    announce_addrs: tuple[str, ...] = ()
    # Offer circuit relay v2 to nodes behind NAT (validators always do; docs/mesh.md "Reachability").
    relay: bool = False
    rounds: int = 0  # training rounds the opening validator opens (0: until stopped)
    # false: this validator runs no training rounds at all (a mesh run for its FHE market or
    # its gossip only; `sealmesh testnet --rounds 0`); its head then closes once its other work is done
    training: bool = True
    epochs: int = 0  # FHE challenge epochs a validator runs (0: none)
    keep_rounds: int = 20  # rounds whose state files, blobs and /status entries are kept
    # Trainer: its own training text (.txt, .jsonl {"text": ...}, or a folder of them);
    # validator: its held-out text for the eval loss. Required outside `sealmesh testnet`.
    data: Path | None = None
    eval_data: Path | None = None
    # `sealmesh testnet` only: train and evaluate on the shipped demo corpus.
    demo_corpus: bool = False
    # A committee of fewer than 3 members or threshold 1 can decrypt single updates: refused
    # unless this is set (and then logged at every start).
    insecure_small_committee: bool = False
    # Demo fault injection for `sealmesh testnet`: "honest", or a misbehaviour the mesh must
    # survive ("garbage" or "slow" miner, "cheat" trainer, "close-early" validator: closes the
    # settlement head before the agreed rounds). Never set on a real node.
    behaviour: str = "honest"
    # Joining a running mesh (issue 15, docs/membership.md): publish a signed join request
    # offering `stake` into the head's escrow; the roles start once a snapshot admits it.
    join: bool = False
    stake: int = 0
    # Trainer: differential privacy of its own update (training/privacy.py, docs/privacy.md).
    # dp_noise_multiplier z > 0 turns it on: the delta is clipped to L2 norm dp_clip_norm and
    # N(0, (z * dp_clip_norm)^2) is added per value before sealing; epsilon is reported at dp_delta.
    dp_noise_multiplier: float = 0.0
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def resolved(self) -> "NodeSettings":
        return replace(self, data_dir=Path(self.data_dir).expanduser(),
                       wallet_path=Path(self.wallet_path).expanduser())


_FIELDS = {f.name: f for f in fields(NodeSettings)}
_PATHS = {"data_dir", "wallet_path", "genesis", "model", "data", "eval_data"}


def load_settings(config: Path | None, overrides: dict[str, Any]) -> NodeSettings:
    """Merge a TOML file (flat keys, or grouped in tables) with non-None overrides."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            doc = tomllib.loads(Path(config).read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {config} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config}: {exc}") from exc
        values.update(_flatten(doc))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(_FIELDS) - {"extra"}
    if unknown:
        raise SettingsError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    if "role" not in values:
        raise SettingsError("a node needs a role: --role trainer|validator|miner")
    return _coerce(values).resolved()


def _flatten(doc: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)  # [node], [mesh], [api] tables are for humans only
        else:
            flat[key] = value
    return flat


def _coerce(values: dict[str, Any]) -> NodeSettings:
    try:
        values["role"] = Role(values["role"])
    except ValueError:
        raise SettingsError(f"unknown role {values['role']!r}; use trainer, validator or miner") from None
    for name in _PATHS & set(values):
        values[name] = Path(values[name])
    for name in ("bootstrap", "announce_addrs"):
        if name in values:
            values[name] = tuple(values[name])
    return NodeSettings(**values)
