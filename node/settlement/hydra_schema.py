"""The hydra-node client API schema (AsyncAPI 2.3) as JSON Schema validators.

hydra-node publishes its API as `api.yaml` (AsyncAPI 2.3, whose schema objects are
JSON Schema draft-07) plus `common.yaml` and `cardanonical/cardano.json`. Every
message the settlement client sends is checked here before it leaves (a failure is
our bug: OutgoingMessageInvalid, a LocalProtocolError), and every message it receives
is checked before it is acted on (a failure is the peer's: IncomingMessageInvalid, a
RemoteProtocolError with a reason).

References are resolved offline: `api.yaml#/...`, `common.yaml#/...` and the
raw.githubusercontent.com URLs that api.yaml uses for cardano.json all map onto the
local copy; any other URI is refused rather than fetched.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import yaml
from jsonschema import Draft7Validator, FormatChecker
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT7

from protocol.errors import LocalProtocolError, RemoteProtocolError

API_FILE = "api.yaml"
# api.yaml points at cardano.json by its published URL; we serve it from disk.
PUBLISHED_BASE = "https://raw.githubusercontent.com/cardano-scaling/hydra/master/hydra-node/json-schemas/"
_LOCAL_FILES = ("api.yaml", "common.yaml", "cardanonical/cardano.json")
_MAX_HINT = 300  # a jsonschema message quotes the instance; keep log lines short

# HTTP payload schemas, by what they describe (channel paths in api.yaml).
DRAFT_COMMIT_REQUEST = "components/schemas/SimpleCommitRequest"
DRAFT_COMMIT_RESPONSE = "components/messages/DraftCommitTxResponse/payload"
TRANSACTION = "components/schemas/Transaction"
UTXO = "components/schemas/UTxO"
HEAD_STATE = "components/schemas/HeadState"
CONFIRMED_SNAPSHOT = "components/schemas/ConfirmedSnapshot"
PROTOCOL_PARAMETERS = "components/schemas/ProtocolParameters"
SUBMIT_L2_TX_RESPONSE = "components/schemas/SubmitL2TxResponse"
# The channel lists one AsyncAPI message per HTTP status; validate against its payload.
L1_TX_SUBMITTED = "channels/~1cardano-transaction/subscribe/message/oneOf/0/payload"
PENDING_DEPOSITS = "channels/~1commits/subscribe/message/payload"
RECOVER_DEPOSIT_RESPONSE = "channels/~1commits~1tx-id/subscribe/message/payload"
POST_TX_ERROR = "components/schemas/PostTxError"


class HydraSchemaUnavailable(FileNotFoundError):
    """The schema files are not where we were told; nothing can be validated."""


class OutgoingMessageInvalid(LocalProtocolError):
    """We were about to send hydra-node a message its schema rejects: our bug."""

    reason = "outgoing_schema_violation"


class IncomingMessageInvalid(RemoteProtocolError):
    """hydra-node (or whoever answers on its port) sent a message its schema rejects."""

    reason = "schema_violation"


class UnknownServerOutput(IncomingMessageInvalid):
    reason = "unknown_tag"


class NotJson(IncomingMessageInvalid):
    reason = "not_json"


def find_hydra_api_dir(repo_root: Path) -> Path | None:
    """The published schema lives in ../shared/hydra-api beside the repository."""
    candidate = Path(repo_root).resolve().parent / "shared" / "hydra-api"
    return candidate if (candidate / API_FILE).is_file() else None


def _date_time_checker() -> FormatChecker:
    checker = FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _is_date_time(value: object) -> bool:
        # RFC 3339 needs a date, a time and an offset; fromisoformat alone is laxer.
        if not isinstance(value, str):
            return True
        parsed = datetime.fromisoformat(value)
        return "T" in value.upper() and parsed.tzinfo is not None

    return checker


@dataclass(frozen=True)
class _Documents:
    api: dict[str, Any]
    registry: Registry


def _load_documents(api_dir: Path) -> _Documents:
    contents: dict[str, Any] = {}
    for name in _LOCAL_FILES:
        path = api_dir / name
        if not path.is_file():
            raise HydraSchemaUnavailable(
                f"hydra API schema file {path} is missing; copy hydra-node/json-schemas there")
        text = path.read_text()
        contents[name] = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)

    def retrieve(uri: str) -> Resource:
        name = uri.removeprefix(PUBLISHED_BASE)
        if name not in contents:
            raise NoSuchResource(ref=uri)  # never fetch from the network
        return DRAFT7.create_resource(contents[name])

    resources = [(name, DRAFT7.create_resource(doc)) for name, doc in contents.items()]
    registry = Registry(retrieve=retrieve).with_resources(resources)
    return _Documents(api=contents[API_FILE], registry=registry)


class HydraApiSchema:
    """Validators for hydra-node's messages, built once per schema directory."""

    def __init__(self, api_dir: Path) -> None:
        self.api_dir = Path(api_dir)
        docs = _load_documents(self.api_dir)
        self._api = docs.api
        self._registry = docs.registry
        self._format_checker = _date_time_checker()
        self.client_input_refs = self._tag_table("publish")
        self.server_output_refs = self._tag_table("subscribe")
        self.api_version: str = str(self._api.get("info", {}).get("version", "?"))

    @classmethod
    @functools.lru_cache(maxsize=4)
    def load(cls, api_dir: Path) -> "HydraApiSchema":
        return cls(Path(api_dir))

    # -- lookup ---------------------------------------------------------------

    def _pointer(self, pointer: str) -> Any:
        node: Any = self._api
        for part in pointer.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def _deref(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            target, _, pointer = node["$ref"].partition("#")
            if target != API_FILE:
                break
            node = self._pointer(pointer)
        return node

    def _tag_table(self, operation: str) -> dict[str, str]:
        """tag -> pointer of the message payload, from the WebSocket channel `/`."""
        table: dict[str, str] = {}
        for entry in self._pointer(f"channels/~1/{operation}/message/oneOf"):
            message_pointer = entry["$ref"].partition("#")[2].strip("/")
            payload = self._deref(self._pointer(message_pointer)["payload"])
            for tag in payload["properties"]["tag"]["enum"]:
                table[tag] = f"{message_pointer}/payload"
        return table

    @functools.lru_cache(maxsize=None)
    def validator(self, pointer: str) -> Draft7Validator:
        schema = {"$ref": f"{API_FILE}#/{pointer.strip('/')}"}
        return Draft7Validator(schema, registry=self._registry,
                               format_checker=self._format_checker)

    def violation(self, pointer: str, instance: Any) -> str | None:
        """The most relevant schema violation, as one short line; None when valid."""
        error = best_match(self.validator(pointer).iter_errors(instance))
        if error is None:
            return None
        return f"{_label(pointer)} {error.json_path}: {error.message[:_MAX_HINT]}"

    # -- checks ---------------------------------------------------------------

    def check_outgoing(self, pointer: str, instance: Any) -> None:
        problem = self.violation(pointer, instance)
        if problem is not None:
            raise OutgoingMessageInvalid(f"refusing to send a message hydra-node would reject: {problem}")

    def check_incoming(self, pointer: str, instance: Any) -> None:
        problem = self.violation(pointer, instance)
        if problem is not None:
            raise IncomingMessageInvalid(f"hydra-node sent a non-conforming message: {problem}")

    def check_client_input(self, message: Mapping[str, Any]) -> None:
        tag = message.get("tag") if isinstance(message, Mapping) else None
        if tag not in self.client_input_refs:
            raise OutgoingMessageInvalid(
                f"{tag!r} is not a client input; known: {sorted(self.client_input_refs)}")
        self.check_outgoing(self.client_input_refs[tag], message)

    def check_server_output(self, message: Any) -> str:
        """Validate one WebSocket output; returns its tag."""
        if not isinstance(message, dict) or not isinstance(message.get("tag"), str):
            raise IncomingMessageInvalid("server output is not an object with a string tag")
        tag = message["tag"]
        if tag not in self.server_output_refs:
            raise UnknownServerOutput(f"server output tag {tag!r} is not in the API schema")
        self.check_incoming(self.server_output_refs[tag], message)
        return tag

    def check_ws_query(self, query: Mapping[str, str]) -> None:
        """The WebSocket channel's query parameters (history, snapshot-utxo, ...)."""
        allowed = self._pointer("channels/~1/bindings/ws/query")
        for name, value in query.items():
            if name not in allowed:
                raise OutgoingMessageInvalid(
                    f"query parameter {name!r} is not in the API; known: {sorted(allowed)}")
            problem = best_match(Draft7Validator(allowed[name]["schema"]).iter_errors(value))
            if problem is not None:
                raise OutgoingMessageInvalid(f"query parameter {name}={value!r}: {problem.message}")


def parse_json_frame(frame: str | bytes) -> Any:
    """One WebSocket text frame as JSON; a peer's garbage becomes a typed error."""
    try:
        return json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotJson(f"WebSocket frame is not JSON: {str(exc)[:_MAX_HINT]}") from None


def _label(pointer: str) -> str:
    """'components/messages/NewTx/payload' -> 'NewTx', for error messages."""
    parts = [p for p in pointer.split("/") if p not in ("payload", "message", "subscribe")]
    return parts[-1].replace("~1", "/")
