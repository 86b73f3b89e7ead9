"""The Brainlock subnet's HTTP protocol, as rules (issue 13): what a sealmesh miner
accepts or refuses on GET /get_client, POST /add_key and POST /compute, with no I/O.

node/roles/brainlock_http.py carries the requests (aiohttp, disk, the trio loop) and asks
these functions at each step; tests/test_brainlock_http.py feeds them directly too.

Order of the checks, cheapest first, every one before the body is read except the last:
    headers well-formed -> Content-Type and Content-Length within the route's limit
    (check_declared_body) -> signer in the registry with the validator role and stake ->
    signed for this miner -> fresh -> uuid not seen (check_headers) -> a free upload slot
    for the signer (check_upload_slot) -> [body streamed] -> signature over the body
    (check_body_signature: the body hash is in the signed string, so it cannot be checked
    before the body is in; the route's size limit is what bounds that cost) -> the
    form's fields (parse_form, require_field, parse_iterations).
Epistula's signed string is "{sha256(body)}.{uuid}.{timestamp}.{signed_for}"
(protocol/epistula.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crypto.identity import verify_signature
from protocol.epistula import (BadSignature, Envelope, FutureTimestamp, Replay, SignerNotAllowed, StaleTimestamp,
                               UnknownSigner, WrongRecipient)
from protocol.errors import RemoteProtocolError
from protocol.membership import Member, SenderPolicy

ROUTES = ("/get_client", "/add_key", "/compute")
FORM_OVERHEAD_BYTES = 16 * 1024  # boundaries and part headers around the fields
KEY_SLACK_BYTES = 16 * 1024  # evaluation keys may differ a little from the circuit's estimate
MAX_FORM_PARTS = 8
MAX_PART_HEADER_BYTES = 4096
MAX_UPLOADS_AT_ONCE = 8  # bodies in flight across every signer (disk and memory bound)
MAX_ITERATIONS_DIGITS = 6

# reason -> HTTP status. Everything else a peer causes is 400.
STATUS = {
    "malformed_envelope": 401, "unknown_signer": 401, "bad_signature": 401, "stale_timestamp": 401,
    "future_timestamp": 401, "replay": 401, "replay_quota": 429, "signer_not_allowed": 403,
    "wrong_recipient": 403, "length_required": 411, "body_too_large": 413, "wrong_content_type": 415,
    "busy_signer": 429, "busy": 503, "not_ready": 503, "unknown_uid": 404, "foreign_uid": 403,
    "too_many_challenges": 429, "key_cache_full": 503, "timeout": 504, "miner_error": 500,
}


class BrainlockRefusal(RemoteProtocolError):
    """A request this route will not serve, with its label."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(hint, reason=reason)


def status_of(reason: str) -> int:
    return STATUS.get(reason, 400)


# --- limits, judged on the headers alone --------------------------------------------------


def route_body_limit(route: str, *, evaluation_key_bytes: int, max_ciphertext_bytes: int) -> int:
    """The most body bytes a route takes, from the loaded circuit's sizes: /add_key one
    set of evaluation keys, /compute one input ciphertext, /get_client nothing."""
    if route == "/get_client":
        return 0
    if route == "/add_key":
        return evaluation_key_bytes + KEY_SLACK_BYTES + FORM_OVERHEAD_BYTES
    if route == "/compute":
        return max_ciphertext_bytes + FORM_OVERHEAD_BYTES
    raise ValueError(f"not a Brainlock route: {route!r}")


def check_declared_body(route: str, content_type: str, declared: int | None, limit: int) -> None:
    """Content-Type and Content-Length against the route, before any body byte is read.
    Chunked bodies (no Content-Length) are refused: their size is not known up front."""
    if route == "/get_client":
        if (declared or 0) > 0:
            raise BrainlockRefusal("body_too_large", f"{route} takes no body, Content-Length says {declared}")
        return
    form_boundary(content_type)
    if declared is None:
        raise BrainlockRefusal("length_required", "send a Content-Length (chunked bodies are refused)")
    if declared > limit:
        raise BrainlockRefusal("body_too_large", f"{route} takes at most {limit} bytes, Content-Length says {declared}")


def check_upload_slot(uploading: Mapping[str, int], signer: str, *, per_signer: int,
                      at_once: int = MAX_UPLOADS_AT_ONCE) -> None:
    """Whether `signer` may start one more body upload, given the bodies in flight."""
    if uploading.get(signer, 0) >= per_signer:
        raise BrainlockRefusal("busy_signer", f"{uploading.get(signer, 0)} uploads of yours are in flight; "
                                              "send one at a time")
    if sum(uploading.values()) >= at_once:
        raise BrainlockRefusal("busy", f"{at_once} uploads in flight; retry shortly")


def check_body_progress(route: str, received: int, limit: int) -> None:
    """A body that streams past its limit is cut there (Content-Length may lie)."""
    if received > limit:
        raise BrainlockRefusal("body_too_large", f"{route} body passed {limit} bytes")


def check_body_complete(received: int, declared: int) -> None:
    if received != declared:
        raise BrainlockRefusal("short_body", f"the body ended after {received} of {declared} bytes")


# --- Epistula over HTTP: the checks that need no body -------------------------------------


def check_headers(verifier: Any, envelope: Envelope, *, now_ms: int, policy: SenderPolicy) -> Member:
    """Every Epistula check that needs no body, in the order EnvelopeVerifier.preflight
    runs them: known signer, allowed (role and stake), signed for this node (an empty
    signed-for is refused: the subnet's own verifier accepts it), fresh, not a replay.
    `verifier` is a protocol.epistula.EnvelopeVerifier (it only reads it here).
    Raises an EpistulaError. The signature is check_body_signature's, once the body is in."""
    member = verifier.directory.member(envelope.signed_by)
    if member is None:
        raise UnknownSigner(f"{envelope.signed_by} is not a member of this mesh")
    if not policy.allows(member):
        raise SignerNotAllowed(f"{envelope.signed_by} (roles {sorted(r.value for r in member.roles)}, stake "
                               f"{member.stake}) may not call this route: validators with stake >= "
                               f"{policy.min_stake} only")
    if envelope.signed_for != verifier.own_hotkey:
        raise WrongRecipient(f"signed for {envelope.signed_for or 'nobody'}, not this miner "
                             f"({verifier.own_hotkey})")
    age = now_ms - envelope.timestamp_ms
    if age > verifier.window_ms:
        raise StaleTimestamp(f"signed {age} ms before the request arrived; the window is {verifier.window_ms} ms")
    if -age > verifier.window_ms:
        raise FutureTimestamp(f"signed {-age} ms in the future; the window is {verifier.window_ms} ms")
    if verifier.replays.seen(envelope.signed_by, envelope.uuid, envelope.timestamp_ms):
        raise Replay(f"uuid {envelope.uuid} was already used by {envelope.signed_by}")
    return member


def signed_string(body_sha256: str, envelope: Envelope) -> bytes:
    """protocol.epistula.signing_payload's string, from a body hashed while it streamed
    (tests/test_brainlock_http.py holds the two equal)."""
    return f"{body_sha256}.{envelope.uuid}.{envelope.timestamp_ms}.{envelope.signed_for}".encode()


def check_body_signature(verifier: Any, envelope: Envelope, body_sha256: str, *, now_ms: int,
                         policy: SenderPolicy) -> Member:
    """The headers again (another request may have spent the uuid meanwhile), then the
    signature over the body; spends the uuid. Raises an EpistulaError."""
    member = check_headers(verifier, envelope, now_ms=now_ms, policy=policy)
    if not verify_signature(envelope.signed_by, signed_string(body_sha256, envelope),
                            bytes.fromhex(envelope.signature[2:])):
        raise BadSignature(f"signature does not verify for {envelope.signed_by} over this body")
    verifier.spend(envelope, now_ms=now_ms)
    return member


# --- multipart/form-data, judged only once the signature holds ----------------------------


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    start: int  # the field's bytes are buffer[start:end]
    end: int


def form_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; BrainlockRefusal otherwise."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise BrainlockRefusal("wrong_content_type", f"expected multipart/form-data, got {kind.strip()!r}")
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            value = value.strip('"')
            if 1 <= len(value) <= 70 and value.isascii():
                return value.encode()
    raise BrainlockRefusal("wrong_content_type", "multipart/form-data without a valid boundary")


def _disposition(headers: bytes) -> tuple[str, str | None]:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        fields: dict[str, str] = {}
        kind, *params = value.decode("utf-8", errors="replace").split(";")
        if kind.strip().lower() != "form-data":
            break
        for param in params:
            k, _, v = param.strip().partition("=")
            fields[k.lower()] = v.strip().strip('"')
        if "name" in fields:
            return fields["name"], fields.get("filename")
    raise BrainlockRefusal("bad_form", "a form part without Content-Disposition: form-data; name=...")


def parse_form(buffer: Any, boundary: bytes) -> dict[str, FormPart]:
    """The parts of a multipart/form-data body (bytes or an mmap), by field name, as
    offsets: a 40 MB key field is located, not copied. Strict: the body starts with the
    first delimiter and ends at the closing one; a repeated field is refused."""
    delimiter = b"--" + boundary
    if buffer[:len(delimiter)] != delimiter:
        raise BrainlockRefusal("bad_form", "the body does not start with the form's boundary")
    parts: dict[str, FormPart] = {}
    at = len(delimiter)
    while True:
        if buffer[at:at + 2] == b"--":
            return parts
        if buffer[at:at + 2] != b"\r\n":
            raise BrainlockRefusal("bad_form", "a boundary not followed by CRLF or --")
        head_end = buffer.find(b"\r\n\r\n", at + 2, at + 2 + MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise BrainlockRefusal("bad_form", f"part headers missing or over {MAX_PART_HEADER_BYTES} bytes")
        name, filename = _disposition(bytes(buffer[at + 2:head_end]))
        start = head_end + 4
        end = buffer.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise BrainlockRefusal("bad_form", f"field {name!r} is not closed by the boundary")
        if name in parts:
            raise BrainlockRefusal("bad_form", f"field {name!r} appears twice")
        if len(parts) >= MAX_FORM_PARTS:
            raise BrainlockRefusal("bad_form", f"more than {MAX_FORM_PARTS} form fields")
        parts[name] = FormPart(name, filename, start, end)
        at = end + 2 + len(delimiter)


def require_field(parts: Mapping[str, FormPart], name: str) -> FormPart:
    part = parts.get(name)
    if part is None:
        raise BrainlockRefusal("missing_field", f"the form has no field {name!r} (fields: {sorted(parts)})")
    return part


def parse_iterations(raw: bytes) -> int:
    """The iterations field as a number; its bound is the keyring's (check_iterations),
    so that an out-of-range count gets the keyring's own reasoned refusal."""
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii() or len(text) > MAX_ITERATIONS_DIGITS:
        raise BrainlockRefusal("bad_iterations", f"iterations must be a whole number, got {text[:20]!r}")
    return int(text)


@dataclass(frozen=True)
class ComputeForm:
    uid: str
    iterations: int
    model_input: FormPart  # the ciphertext's offsets in the body


def parse_compute_form(body: Any, content_type: str) -> ComputeForm:
    """/compute's fields: model_input (a ciphertext), uid, iterations."""
    parts = parse_form(body, form_boundary(content_type))
    model_input = require_field(parts, "model_input")
    uid_part, iterations_part = require_field(parts, "uid"), require_field(parts, "iterations")
    uid = bytes(body[uid_part.start:uid_part.end]).decode("utf-8", errors="replace").strip()
    iterations = parse_iterations(bytes(body[iterations_part.start:iterations_part.end]))
    return ComputeForm(uid, iterations, model_input)


__all__ = [
    "CHAINED_MIN_EQUAL", "FORM_OVERHEAD_BYTES", "MAX_UPLOADS_AT_ONCE", "ROUTES", "STATUS", "WRONG_CHAINED_OUTPUT",
    "BrainlockRefusal", "ChainFault", "ComputeForm", "FormPart", "check_body_complete", "check_body_progress",
    "check_body_signature", "check_declared_body", "check_headers", "check_upload_slot", "equal_fraction",
    "form_boundary", "judge_chain", "offered_endpoint", "parse_compute_form", "parse_endpoint", "parse_form",
    "parse_iterations", "require_field", "route_body_limit", "signed_string", "status_of",
]


# --- a validator's side: where a miner speaks this protocol --------------------------------


def parse_endpoint(text: str) -> tuple[str, int]:
    """"host:port" of a miner's Brainlock HTTP server; ValueError saying what is wrong."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (for example 203.0.113.7:8091)")
    return host.strip("[]"), int(port)


# --- a validator's side: every chunk of a chained /compute is judged ----------------------

WRONG_CHAINED_OUTPUT = "wrong_chained_output"
# Honest FHE lands a PBS step off the clear circuit in a few entries: over the tiny
# synthetic CNV's chains 90-99 % of the output integers equal the clear chain's
# (tests/test_brainlock_process.py's transcript). A miner that stops chaining and sends an
# earlier output again matches ~10 %.
CHAINED_MIN_EQUAL = 0.8


@dataclass(frozen=True)
class ChainFault:
    iteration: int  # from 1
    equal_fraction: float

    def detail(self, iterations: int) -> str:
        return (f"iteration {self.iteration} of {iterations}: {self.equal_fraction:.0%} of the output "
                f"integers equal our clear chain's (at least {CHAINED_MIN_EQUAL:.0%} wanted)")


def equal_fraction(got: Any, expected: Any) -> float:
    """The fraction of entries of two equal-length integer vectors that are equal."""
    if len(got) != len(expected) or not len(expected):
        return 0.0
    return float(sum(int(a) == int(b) for a, b in zip(got, expected))) / len(expected)


def judge_chain(fractions: "list[float] | tuple[float, ...]", *, first: int = 2,
                min_equal: float = CHAINED_MIN_EQUAL) -> ChainFault | None:
    """The first chained iteration (numbered from `first`) whose output strays from the
    clear chain, or None. fractions[i] is iteration first+i's equal_fraction. Chunk 1 is
    scored as a libp2p result is (argmax and cosine); this rule covers the chunks after."""
    for i, fraction in enumerate(fractions):
        if not fraction >= min_equal:
            return ChainFault(first + i, float(fraction))
    return None


def offered_endpoint(announced_addrs: "list[str] | tuple[str, ...]", brainlock_port: int) -> tuple[str, int] | None:
    """Where a validator dials a miner's Brainlock server: the host of the miner's first
    direct announced address (/ip4, /ip6, /dns4, /dns6, /dns; relayed /p2p-circuit ones
    skipped) and the port its ModelOffer names; None without a port or such an address.
    Only the miner's own announced host is ever dialled (ModelOffer says why)."""
    if not brainlock_port:
        return None
    for addr in announced_addrs:
        if "/p2p-circuit" in addr:
            continue
        parts = addr.split("/")
        if len(parts) >= 3 and parts[0] == "" and parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") and parts[2]:
            return parts[2], int(brainlock_port)
    return None
