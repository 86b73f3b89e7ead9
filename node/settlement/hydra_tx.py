"""Cardano transactions for a Hydra head, built and signed with pycardano.

A sealmesh ledger record (a round result or a score report) rides in the metadata of
an ordinary transaction inside the head, under ONE label, METADATA_LABEL = 6673:

    6673: {"v": 1, "records": [record, ...]}
    round result:  {"type": "round_result", "round": int, "adapter": text,
                    "contributors": [text, ...], "rewards": [[text, int], ...],
                    "blobs": [[text, bytes32], ...]}          # blob id, sha256 digest
    score report:  {"type": "score_report", "epoch": int,
                    "scores_ppm": [[text, int], ...], "rewards": [[text, int], ...]}

`text` is a string when it fits Cardano's 64-byte limit on metadata strings, and a
list of strings of at most 64 UTF-8 bytes each (split on character boundaries)
otherwise. Metadata has no floats, so scores travel as parts per million. Pairs are
lists, not maps, so order is kept and long hotkeys may be keys.

Also here: hydra-node's JSON shapes (UTxO objects, the Transaction text envelope) to
and from pycardano, and the witness check a head applies to a transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

import nacl.exceptions
import nacl.signing
from pycardano import (
    Address,
    AlonzoMetadata,
    AuxiliaryData,
    Asset,
    AssetName,
    Metadata,
    MultiAsset,
    PaymentSigningKey,
    PaymentVerificationKey,
    ScriptHash,
    Transaction,
    TransactionBody,
    TransactionId,
    TransactionInput,
    TransactionOutput,
    TransactionWitnessSet,
    UTxO,
    Value,
    VerificationKeyWitness,
)

from protocol.errors import LocalProtocolError, RemoteProtocolError

METADATA_LABEL = 6673
RECORD_FORMAT_VERSION = 1
MAX_METADATA_TEXT = 64  # bytes; Cardano ledger rule for metadata strings and bytes
MAX_METADATA_INT = 2**64 - 1
PPM = 1_000_000
ENVELOPE_DESCRIPTION = "Ledger Cddl Format"


class BadTransaction(RemoteProtocolError):
    reason = "bad_transaction"


class MalformedRecord(RemoteProtocolError):
    reason = "bad_l2_record"


class BadUtxo(RemoteProtocolError):
    reason = "bad_utxo"


# -- ledger records ---------------------------------------------------------------


@dataclass(frozen=True)
class BlobRef:
    blob_id: str
    sha256: bytes


@dataclass(frozen=True)
class RoundResultRecord:
    round: int
    adapter_id: str
    contributors: tuple[str, ...]
    rewards: Mapping[str, int]
    blobs: tuple[BlobRef, ...] = ()


@dataclass(frozen=True)
class ScoreReportRecord:
    epoch: int
    scores_ppm: Mapping[str, int]  # miner hotkey -> score in parts per million
    rewards: Mapping[str, int] = field(default_factory=dict)


L2Record = Union[RoundResultRecord, ScoreReportRecord]


def split_text(text: str) -> str | list[str]:
    """A string as metadata: itself if <= 64 UTF-8 bytes, else <= 64-byte chunks."""
    if len(text.encode()) <= MAX_METADATA_TEXT:
        return text
    chunks, current = [], ""
    for char in text:  # split on characters so no chunk holds half a code point
        if len((current + char).encode()) > MAX_METADATA_TEXT:
            chunks.append(current)
            current = ""
        current += char
    chunks.append(current)
    return chunks


def join_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "".join(value)
    raise MalformedRecord(f"expected metadata text (a string or a list of strings), got {value!r:.80}")


def _amount(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_METADATA_INT:
        raise LocalProtocolError(f"{what} must be an integer in [0, 2^64-1], got {value!r}")
    return value


def _pairs(mapping: Mapping[str, int], what: str) -> list[list[Any]]:
    return [[split_text(key), _amount(value, f"{what}[{key}]")] for key, value in mapping.items()]


def encode_record(record: L2Record) -> dict[str, Any]:
    if isinstance(record, RoundResultRecord):
        for blob in record.blobs:
            if len(blob.sha256) != 32:
                raise LocalProtocolError(
                    f"blob {blob.blob_id}: sha256 must be 32 bytes, got {len(blob.sha256)}")
        return {"type": "round_result", "round": _amount(record.round, "round"),
                "adapter": split_text(record.adapter_id),
                "contributors": [split_text(c) for c in record.contributors],
                "rewards": _pairs(record.rewards, "rewards"),
                "blobs": [[split_text(b.blob_id), bytes(b.sha256)] for b in record.blobs]}
    if isinstance(record, ScoreReportRecord):
        for miner, score in record.scores_ppm.items():
            if _amount(score, f"score of {miner}") > PPM:
                raise LocalProtocolError(f"score of {miner} is {score} ppm, above {PPM}")
        return {"type": "score_report", "epoch": _amount(record.epoch, "epoch"),
                "scores_ppm": _pairs(record.scores_ppm, "scores_ppm"),
                "rewards": _pairs(record.rewards, "rewards")}
    raise LocalProtocolError(f"not a ledger record: {type(record).__name__}")


def records_metadata(records: Sequence[L2Record]) -> AuxiliaryData:
    """Auxiliary data carrying `records` under METADATA_LABEL (length rules checked)."""
    if not records:
        raise LocalProtocolError("a record transaction needs at least one record")
    value = {"v": RECORD_FORMAT_VERSION, "records": [encode_record(r) for r in records]}
    return AuxiliaryData(AlonzoMetadata(metadata=Metadata({METADATA_LABEL: value})))


def _decode_pairs(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, list):
        raise MalformedRecord(f"{what} must be a list of [text, int] pairs")
    pairs: dict[str, int] = {}
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int)):
            raise MalformedRecord(f"{what}: bad pair {pair!r:.80}")
        pairs[join_text(pair[0])] = pair[1]
    return pairs


def decode_record(value: Any) -> L2Record:
    if not isinstance(value, dict):
        raise MalformedRecord("a record must be a metadata map")
    try:
        kind = value["type"]
        if kind == "round_result":
            blobs = []
            for blob in value["blobs"]:
                if not (isinstance(blob, list) and len(blob) == 2 and isinstance(blob[1], bytes)
                        and len(blob[1]) == 32):
                    raise MalformedRecord(f"bad blob reference {blob!r:.80}")
                blobs.append(BlobRef(join_text(blob[0]), blob[1]))
            if not isinstance(value["round"], int):
                raise MalformedRecord("round must be an integer")
            return RoundResultRecord(
                round=value["round"], adapter_id=join_text(value["adapter"]),
                contributors=tuple(join_text(c) for c in value["contributors"]),
                rewards=_decode_pairs(value["rewards"], "rewards"), blobs=tuple(blobs))
        if kind == "score_report":
            if not isinstance(value["epoch"], int):
                raise MalformedRecord("epoch must be an integer")
            return ScoreReportRecord(epoch=value["epoch"],
                                     scores_ppm=_decode_pairs(value["scores_ppm"], "scores_ppm"),
                                     rewards=_decode_pairs(value["rewards"], "rewards"))
    except (KeyError, TypeError) as exc:
        raise MalformedRecord(f"record is missing or mistypes a field: {exc}") from None
    raise MalformedRecord(f"unknown record type {value.get('type')!r:.40}")


def records_in(tx: Transaction) -> list[L2Record]:
    """The sealmesh records a transaction carries (empty when it carries none)."""
    if tx.auxiliary_data is None:
        return []
    era_metadata = tx.auxiliary_data.data  # Alonzo/Shelley-MA wrap Metadata; Shelley is bare
    metadata = era_metadata if isinstance(era_metadata, Metadata) else era_metadata.metadata
    if metadata is None or METADATA_LABEL not in metadata.data:
        return []
    body = metadata.data[METADATA_LABEL]
    if not isinstance(body, dict) or body.get("v") != RECORD_FORMAT_VERSION:
        raise MalformedRecord(f"label {METADATA_LABEL} holds no version-{RECORD_FORMAT_VERSION} record set")
    if not isinstance(body.get("records"), list):
        raise MalformedRecord("records must be a list")
    return [decode_record(r) for r in body["records"]]


# -- hydra-node JSON <-> pycardano ----------------------------------------------------


def txin_ref(txin: TransactionInput) -> str:
    return f"{txin.transaction_id.payload.hex()}#{txin.index}"


def parse_txin(ref: str) -> TransactionInput:
    tx_id, sep, index = ref.partition("#")
    try:
        if not sep or len(tx_id) != 64:
            raise ValueError(ref)
        return TransactionInput(TransactionId(bytes.fromhex(tx_id)), int(index))
    except ValueError:
        raise BadUtxo(f"not a TxIn 'txid#index': {ref!r:.80}") from None


def value_from_json(value: Mapping[str, Any]) -> Value:
    assets = MultiAsset()
    for policy, names in value.items():
        if policy == "lovelace":
            continue
        policy_assets = Asset()
        for name, quantity in names.items():
            policy_assets[AssetName(bytes.fromhex(name))] = quantity
        assets[ScriptHash(bytes.fromhex(policy))] = policy_assets
    return Value(int(value.get("lovelace", 0)), assets)


def value_to_json(amount: Value | int) -> dict[str, Any]:
    value = amount if isinstance(amount, Value) else Value(amount)
    body: dict[str, Any] = {"lovelace": value.coin}
    for policy, assets in value.multi_asset.items():
        body[policy.payload.hex()] = {name.payload.hex(): q for name, q in assets.items()}
    return body


def txout_from_json(txout: Mapping[str, Any]) -> TransactionOutput:
    try:
        return TransactionOutput(Address.from_primitive(txout["address"]), value_from_json(txout["value"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadUtxo(f"not a TxOut: {exc}") from None
    except Exception as exc:  # pycardano raises its own decoding errors for bad bech32
        raise BadUtxo(f"not a TxOut: {exc}") from None


def txout_to_json(txout: TransactionOutput) -> dict[str, Any]:
    return {"address": str(txout.address), "value": value_to_json(txout.amount)}


def utxo_from_json(utxo: Mapping[str, Mapping[str, Any]]) -> list[UTxO]:
    return [UTxO(parse_txin(ref), txout_from_json(out)) for ref, out in utxo.items()]


def utxo_to_json(utxos: Iterable[UTxO]) -> dict[str, dict[str, Any]]:
    return {txin_ref(u.input): txout_to_json(u.output) for u in utxos}


def owned_utxo(utxo: Mapping[str, Mapping[str, Any]], address: Address) -> list[UTxO]:
    """The entries of a hydra UTxO object locked by `address`."""
    wanted = str(address)
    return [u for u in utxo_from_json(utxo) if str(u.output.address) == wanted]


def tx_id_hex(tx: Transaction) -> str:
    return tx.transaction_body.hash().hex()


def produced_utxo(tx: Transaction) -> dict[str, dict[str, Any]]:
    """The outputs `tx` creates, as a hydra UTxO object."""
    tx_id = tx_id_hex(tx)
    return {f"{tx_id}#{i}": txout_to_json(o) for i, o in enumerate(tx.transaction_body.outputs)}


def spent_refs(tx: Transaction) -> list[str]:
    return [txin_ref(i) for i in tx.transaction_body.inputs]


def tx_envelope(tx: Transaction) -> dict[str, str]:
    """hydra-node's Transaction shape: a cardano-cli text envelope plus txId."""
    witnessed = bool(tx.transaction_witness_set.vkey_witnesses)
    return {"type": "Witnessed Tx ConwayEra" if witnessed else "Unwitnessed Tx ConwayEra",
            "description": ENVELOPE_DESCRIPTION, "cborHex": tx.to_cbor_hex(), "txId": tx_id_hex(tx)}


def tx_from_envelope(envelope: Mapping[str, Any]) -> Transaction:
    try:
        tx = Transaction.from_cbor(envelope["cborHex"])
    except KeyError:
        raise BadTransaction("transaction envelope has no cborHex") from None
    except Exception as exc:  # pycardano and cbor2 raise a zoo of decoding errors
        raise BadTransaction(f"cborHex is not a Conway transaction: {str(exc)[:200]}") from None
    claimed = envelope.get("txId")
    if claimed is not None and claimed != tx_id_hex(tx):
        raise BadTransaction(f"txId {claimed} does not match the body hash {tx_id_hex(tx)}")
    return tx


def unwitnessed_inputs(tx: Transaction, spent: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Inputs whose owning payment key did not sign the body (a head rejects these)."""
    body_hash = tx.transaction_body.hash()
    signers = set()
    for witness in tx.transaction_witness_set.vkey_witnesses or ():
        try:
            nacl.signing.VerifyKey(witness.vkey.payload).verify(body_hash, witness.signature)
        except (nacl.exceptions.BadSignatureError, ValueError):
            continue
        signers.add(witness.vkey.hash().payload)
    missing = []
    for ref in spent_refs(tx):
        owner = txout_from_json(spent[ref]).address.payment_part
        if owner is None or owner.payload not in signers:
            missing.append(ref)
    return missing


# -- building and signing -------------------------------------------------------------


@dataclass(frozen=True)
class LedgerRules:
    """The ledger limits a head transaction must meet, from hydra-node's protocol parameters.

    Fee: Cardano's linear fee, fee_fixed + fee_per_byte * size (heads often run at zero).
    Size: a record transaction larger than max_tx_size is refused by the head, so records
    that do not fit must be split over several transactions.
    """

    fee_fixed: int = 0
    fee_per_byte: int = 0
    max_tx_size: int = 16_384  # mainnet's value since Alonzo

    @classmethod
    def from_protocol_parameters(cls, params: Mapping[str, Any]) -> "LedgerRules":
        def lovelace(value: Any) -> int:
            return int(value["lovelace"] if isinstance(value, Mapping) else value)
        return cls(fee_fixed=lovelace(params["txFeeFixed"]), fee_per_byte=lovelace(params["txFeePerByte"]),
                   max_tx_size=int(params["maxTxSize"]))

    def fee_for(self, size: int) -> int:
        return self.fee_fixed + self.fee_per_byte * size


def _witnessed(body: TransactionBody, keys: Sequence[PaymentSigningKey],
               aux: AuxiliaryData | None, existing: TransactionWitnessSet | None = None) -> Transaction:
    witnesses = list((existing.vkey_witnesses or []) if existing is not None else [])
    for key in keys:
        vkey = PaymentVerificationKey.from_signing_key(key)
        witnesses.append(VerificationKeyWitness(vkey, key.sign(body.hash())))
    witness_set = existing if existing is not None else TransactionWitnessSet()
    witness_set.vkey_witnesses = witnesses or None
    return Transaction(body, witness_set, auxiliary_data=aux)


def sign_transaction(tx: Transaction, keys: Sequence[PaymentSigningKey]) -> Transaction:
    """Add vkey witnesses to a drafted transaction (e.g. hydra-node's deposit draft)."""
    return _witnessed(tx.transaction_body, keys, tx.auxiliary_data, tx.transaction_witness_set)


def build_head_tx(spend: Sequence[UTxO], pay_to: Sequence[TransactionOutput], change_address: Address,
                  signing_keys: Sequence[PaymentSigningKey], records: Sequence[L2Record] = (),
                  rules: LedgerRules = LedgerRules()) -> Transaction:
    """A signed transaction spending head UTxO: pays `pay_to`, returns change, carries records."""
    if not spend:
        raise LocalProtocolError("a transaction must spend at least one head UTxO")
    owners = {PaymentVerificationKey.from_signing_key(k).hash().payload for k in signing_keys}
    for utxo in spend:
        part = utxo.output.address.payment_part
        if part is None or part.payload not in owners:
            raise LocalProtocolError(f"no signing key for input {txin_ref(utxo.input)} "
                                     f"(locked by {utxo.output.address})")
    aux = records_metadata(records) if records else None
    total_in = sum((_as_value(u.output.amount) for u in spend), Value(0))
    total_out = sum((_as_value(o.amount) for o in pay_to), Value(0))
    fee = 0
    for _ in range(4):  # the fee changes the size, which changes the fee; settles in 2
        change = total_in - total_out - Value(fee)
        if change.coin < 0 or any(q < 0 for assets in change.multi_asset.values() for q in assets.values()):
            raise LocalProtocolError(f"inputs hold {total_in.coin} lovelace; outputs and fee need "
                                     f"{total_out.coin + fee}")
        outputs = list(pay_to)
        if change.coin > 0 or change.multi_asset:
            outputs.append(TransactionOutput(change_address, change if change.multi_asset else change.coin))
        body = TransactionBody(inputs=[u.input for u in spend], outputs=outputs, fee=fee,
                               auxiliary_data_hash=aux.hash() if aux is not None else None)
        tx = _witnessed(body, signing_keys, aux)
        size = len(tx.to_cbor())
        if size > rules.max_tx_size:
            raise LocalProtocolError(f"transaction is {size} bytes, above the ledger's {rules.max_tx_size}; "
                                     "split the records over several transactions")
        needed = rules.fee_for(size)
        if needed <= fee:
            return tx
        fee = needed
    raise LocalProtocolError("fee did not settle; check the protocol parameters")


def _as_value(amount: Value | int) -> Value:
    return amount if isinstance(amount, Value) else Value(amount)
