"""Check a peer's Cap'n Proto bytes before Concrete reads them (issue 11 finding 3).

Concrete serializes every value it hands out (fhe.Value: a ciphertext or an encrypted
result; fhe.EvaluationKeys) as ONE unpacked Cap'n Proto message, nothing before or after
it (checked on digits-cnn's own bytes: a 1824 B ciphertext of 2 segments, a 164184 B
result of 2 segments, 39108960 B of evaluation keys in 3 segments). The message is

    u32 segment_count - 1 | u32 size_in_words x segment_count | pad to 8 | segments

Concrete's reader trusts that table. A segment declared larger than the bytes present
makes it retry a "Premature EOF" read every 8 KiB, logging a stack trace each time and
holding the GIL (an 8 MiB declaration froze a validator 2.6 s; 32 GiB is allowed), and it
reads with a traversal limit of 7e9 words, so pointers that share one blob make its copy
of the message many times larger than the bytes sent. So before Concrete sees peer bytes:

  * the segment table is complete, names 1..MAX_SEGMENTS segments, the first non-empty,
    and the sizes it declares add up to exactly the buffer's length, which is under the
    caller's cap (no trailing bytes either);
  * every pointer lands inside its segment, nothing is a capability, nesting stays within
    MAX_NESTING, at most `max_pointers` pointers are followed, and the words reached by
    following them (counted each time they are reached, as Cap'n Proto's traversal limit
    does) are at most the words sent: no aliasing, so whatever Concrete builds from the
    message is about the size of the message.

Pure Python, no Concrete import; a few milliseconds on a result, tens on evaluation keys.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import RemoteProtocolError

WORD = 8
MAX_SEGMENTS = 64  # Concrete writes 2 (values) or 3 (keys); Cap'n Proto itself allows 512
MAX_NESTING = 64  # Concrete's ReaderOptions nesting limit
DEFAULT_MAX_POINTERS = 1 << 16  # honest digits-cnn messages follow a few dozen

_STRUCT, _LIST, _FAR, _OTHER = 0, 1, 2, 3
_ELEMENT_BITS = {0: 0, 1: 1, 2: 8, 3: 16, 4: 32, 5: 64}  # list element size codes 0-5
_POINTER_LIST, _COMPOSITE_LIST = 6, 7


class CapnpFramingError(RemoteProtocolError):
    """Bytes that are not one well-formed, non-aliased Cap'n Proto message."""

    reason = "bad_capnp_framing"


@dataclass(frozen=True)
class CapnpShape:
    """What the check found: segment sizes (words), pointers followed, words reached, and
    where the byte lists (Data blobs: key material, LWE payloads) lie, as (offset, length)
    in bytes from the buffer's start, in buffer order."""

    segment_words: tuple[int, ...]
    pointers: int
    words_reached: int
    data_spans: tuple[tuple[int, int], ...] = ()

    @property
    def total_bytes(self) -> int:
        return _header_bytes(len(self.segment_words)) + WORD * sum(self.segment_words)


def _header_bytes(segment_count: int) -> int:
    return WORD * ((4 + 4 * segment_count + WORD - 1) // WORD)


def read_segment_table(buf: bytes, *, max_bytes: int,
                       error: type[RemoteProtocolError] = CapnpFramingError) -> tuple[int, ...]:
    """The declared segment sizes in words, once they are shown to frame `buf` exactly.

    Raises `error` with reason capnp_truncated, capnp_segment_count, capnp_oversized or
    capnp_size_mismatch. Reads at most 4 + 4*MAX_SEGMENTS bytes: constant time.
    """
    if len(buf) > max_bytes:
        raise error(f"{len(buf)} bytes, at most {max_bytes} allowed here", reason="capnp_oversized")
    if len(buf) < WORD:
        raise error(f"{len(buf)} bytes cannot hold a Cap'n Proto segment table", reason="capnp_truncated")
    count = struct.unpack_from("<I", buf, 0)[0] + 1
    if count > MAX_SEGMENTS:
        raise error(f"{count} segments declared, at most {MAX_SEGMENTS}", reason="capnp_segment_count")
    header = _header_bytes(count)
    if len(buf) < header:
        raise error(f"the table of {count} segments needs {header} bytes, {len(buf)} sent",
                    reason="capnp_truncated")
    sizes = struct.unpack_from(f"<{count}I", buf, 4)
    if sizes[0] == 0:
        raise error("the first segment is empty: no root pointer", reason="capnp_truncated")
    declared = header + WORD * sum(sizes)  # Python ints: a u32 per segment cannot wrap
    if declared > max_bytes:
        raise error(f"segments declare {declared} bytes, at most {max_bytes} allowed here",
                    reason="capnp_oversized")
    if declared != len(buf):
        raise error(f"segments declare {declared} bytes but {len(buf)} were sent",
                    reason="capnp_size_mismatch")
    return sizes


class _Walker:
    """Follow every pointer from the root once per time it is reached (like Cap'n Proto's
    traversal limit), checking bounds, with an explicit stack (no Python recursion)."""

    def __init__(self, buf: bytes, sizes: tuple[int, ...], max_pointers: int,
                 error: type[RemoteProtocolError]) -> None:
        self.words = memoryview(buf).cast("B")
        self.error = error
        self.max_pointers = max_pointers
        self.budget = sum(sizes)  # words reached may not exceed the words sent
        self.starts: list[int] = []  # each segment's first word, counted from the buffer's start
        word = _header_bytes(len(sizes)) // WORD
        for size in sizes:
            self.starts.append(word)
            word += size
        self.sizes = sizes
        self.pointers = 0
        self.reached = 0
        self.data_spans: list[tuple[int, int]] = []

    def fail(self, hint: str, reason: str) -> None:
        raise self.error(hint, reason=reason)

    def pointer(self, segment: int, index: int) -> int:
        return struct.unpack_from("<Q", self.words, WORD * (self.starts[segment] + index))[0]

    def inside(self, segment: int, start: int, words: int) -> None:
        if start < 0 or words < 0 or start + words > self.sizes[segment]:
            self.fail(f"a pointer reaches words {start}..{start + words} of segment {segment} "
                      f"({self.sizes[segment]} words)", "capnp_pointer_out_of_bounds")

    def charge(self, words: int) -> None:
        self.reached += words
        if self.reached > self.budget:
            self.fail(f"pointers reach more than the {self.budget} words sent: shared (aliased) "
                      "content would make the reader's copy larger than the message", "capnp_amplified")

    def walk(self) -> CapnpShape:
        stack = [(0, 0, 0)]  # (segment, word index of a pointer, nesting depth)
        while stack:
            segment, index, depth = stack.pop()
            self.follow(segment, index, depth, stack)
        return CapnpShape(tuple(self.sizes), self.pointers, self.reached, tuple(sorted(self.data_spans)))

    def follow(self, segment: int, index: int, depth: int, stack: list) -> None:
        word = self.pointer(segment, index)
        if word == 0:
            return  # null
        self.pointers += 1
        if self.pointers > self.max_pointers:
            self.fail(f"more than {self.max_pointers} pointers", "capnp_too_many_pointers")
        if depth > MAX_NESTING:
            self.fail(f"nesting deeper than {MAX_NESTING}", "capnp_too_deep")
        kind = word & 3
        if kind == _OTHER:
            self.fail("a capability pointer: values and keys carry none", "capnp_capability")
        if kind == _FAR:
            segment, target, word = self.land(word)
        else:
            target = index + 1 + _signed30(word >> 2)
        self.content(segment, target, word, depth, stack)

    def land(self, far: int) -> tuple[int, int, int]:
        """A far pointer's landing pad: (segment, first content word, the pointer to use)."""
        double = (far >> 2) & 1
        pad_segment, pad_index = far >> 32, (far >> 3) & ((1 << 29) - 1)
        if pad_segment >= len(self.sizes):
            self.fail(f"a far pointer names segment {pad_segment} of {len(self.sizes)}",
                      "capnp_pointer_out_of_bounds")
        self.inside(pad_segment, pad_index, 2 if double else 1)
        pad = self.pointer(pad_segment, pad_index)
        if not double:
            if pad & 3 == _FAR:
                self.fail("a far pointer lands on another far pointer", "capnp_pointer_out_of_bounds")
            return pad_segment, pad_index + 1 + _signed30(pad >> 2), pad
        tag = self.pointer(pad_segment, pad_index + 1)
        if pad & 7 != _FAR or (pad >> 32) >= len(self.sizes) or tag & 3 == _FAR or tag & 3 == _OTHER:
            self.fail("a malformed double-far landing pad", "capnp_pointer_out_of_bounds")
        return pad >> 32, (pad >> 3) & ((1 << 29) - 1), tag

    def content(self, segment: int, target: int, word: int, depth: int, stack: list) -> None:
        if word & 3 == _STRUCT:
            data, pointers = (word >> 32) & 0xFFFF, word >> 48
            self.inside(segment, target, data + pointers)
            self.charge(data + pointers)
            stack.extend((segment, target + data + i, depth + 1) for i in range(pointers))
            return
        size_code, count = (word >> 32) & 7, word >> 35
        if size_code == _COMPOSITE_LIST:
            self.inside(segment, target, count + 1)
            tag = self.pointer(segment, target)
            elements, data, pointers = _signed30(tag >> 2), (tag >> 32) & 0xFFFF, tag >> 48
            if tag & 3 != _STRUCT or elements < 0 or elements * (data + pointers) > count:
                self.fail("a composite list whose tag does not fit its words", "capnp_pointer_out_of_bounds")
            self.charge(count + 1)
            for element in range(elements):
                first = target + 1 + element * (data + pointers) + data
                stack.extend((segment, first + i, depth + 1) for i in range(pointers))
            return
        if size_code == _POINTER_LIST:
            self.inside(segment, target, count)
            self.charge(count)
            stack.extend((segment, target + i, depth + 1) for i in range(count))
            return
        words = (count * _ELEMENT_BITS[size_code] + 63) // 64
        self.inside(segment, target, words)
        self.charge(words)
        if size_code == 2 and count:
            self.data_spans.append((WORD * (self.starts[segment] + target), count))


def _signed30(value: int) -> int:
    value &= (1 << 30) - 1
    return value - (1 << 30) if value & (1 << 29) else value


def check_capnp_message(buf: bytes, *, max_bytes: int, max_pointers: int = DEFAULT_MAX_POINTERS,
                        error: type[RemoteProtocolError] = CapnpFramingError) -> CapnpShape:
    """Refuse `buf` (raise `error` with a capnp_* reason) unless it is exactly one Cap'n
    Proto message of at most `max_bytes`, pointers in bounds and not aliased."""
    if not isinstance(buf, (bytes, bytearray)):
        raise error(f"expected bytes, got {type(buf).__name__}", reason="capnp_truncated")
    sizes = read_segment_table(buf, max_bytes=max_bytes, error=error)
    return _Walker(buf, sizes, max_pointers, error).walk()


__all__ = ["CapnpFramingError", "CapnpShape", "DEFAULT_MAX_POINTERS", "MAX_NESTING", "MAX_SEGMENTS",
           "check_capnp_message", "read_segment_table"]
