"""The event every stage agrees on: one TCP segment conntrack rejected or ignored.

probe/decode build Events from BPF records, aggregate/advise/render/report consume
them, and the NDJSON files written by `--write`/`--json` are Events serialised with
`to_dict()` and read back with `Event.from_dict()`, which validates every field and
raises SchemaError with a one-line message naming the field.

Schema rules: bump SCHEMA_VERSION whenever a field changes meaning or disappears.  New
fields with defaults do not need a bump (readers ignore keys they do not know).  Records
from a newer schema are refused with "upgrade conntrace"; when an older schema exists,
translate it in check_schema's caller rather than guessing.  The record types of a
recording (event, meta, lost, omitted, summary, top) are listed below as RECORD_*.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, fields
from typing import Optional

SCHEMA_VERSION = 1

# Stable reason codes.  The kernel's wording changes between eras; these do not.
REASONS = {
    "SEQ_OVER": "segment starts beyond the receiver's window (SEQ over upper bound)",
    "ACK_OVER": "ACK acknowledges data the other side never sent (ACK over upper bound)",
    "SACK_OVER": "a SACK block's right edge lies beyond the data sent, while the ACK number is in range",
    "SEQ_UNDER": "segment ends before data already acknowledged (SEQ under lower bound)",
    "ACK_UNDER": "ACK far behind what was already acknowledged (ACK under lower bound)",
    "OVERSHOT": "segment carries more bytes than the receiver's window allows",
    "INVALID_RST": "RST whose sequence number is behind the peer's highest ACK",
    "INVALID_STATE": "segment not allowed in the connection's TCP state",
    "IGNORED_STATE": "segment ignored by the TCP state machine (e.g. SYN on an established entry)",
    "CHALLENGE_ACK": "challenge ACK in LAST_ACK ignored",
    "LOWER_TIMEOUT": "out-of-window FIN/RST lowered the entry's timeout",
    "BAD_CHECKSUM": "TCP checksum wrong at PRE_ROUTING",
    "TRUNCATED": "TCP header shorter than its data offset says",
    "SHORT_PACKET": "TCP header could not be read",
    "BAD_FLAGS": "invalid TCP flag combination",
    "INVALID_NEW": "first segment of an unknown connection cannot open one",
    "UNKNOWN": "a reason conntrace could not classify (see message)",
}

# Reasons that come from the window check (tcp_in_window); be_liberal covers these.
WINDOW_REASONS = frozenset({"SEQ_OVER", "ACK_OVER", "SACK_OVER", "SEQ_UNDER", "ACK_UNDER", "OVERSHOT"})

VERDICTS = ("invalid", "ignored", "accepted-liberal", "info")

DIRECTIONS = ("original", "reply")

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")

# The kernel's own two-letter names (sES, sSS, ...) keep the trace table narrow.
STATE_SHORT = {"NONE": "NO", "SYN_SENT": "SS", "SYN_RECV": "SR", "ESTABLISHED": "ES",
               "FIN_WAIT": "FW", "CLOSE_WAIT": "CW", "LAST_ACK": "LA", "TIME_WAIT": "TW",
               "CLOSE": "CL", "SYN_SENT2": "S2"}

# struct ip_ct_tcp_state.flags (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
TCP_FLAG_WINDOW_SCALE = 0x01
TCP_FLAG_SACK_PERM = 0x02
TCP_FLAG_CLOSE_INIT = 0x04
TCP_FLAG_BE_LIBERAL = 0x08
TCP_FLAG_DATA_UNACKNOWLEDGED = 0x10
TCP_FLAG_MAXACK_SET = 0x20

# Record types in an NDJSON recording.  Every record carries "schema" and "type";
# schema-1 event records written before "type" existed are read as events.
RECORD_EVENT = "event"        # one Event (Event.to_dict())
RECORD_META = "meta"          # first line: who wrote the file, host, kernel, rung, sysctls
RECORD_LOST = "lost"          # events the kernel could not hand to user space
RECORD_OMITTED = "omitted"    # events counted but not written (report's event budget)
RECORD_SUMMARY = "summary"    # last line: totals of the capture
RECORD_TOP = "top"            # one `conntrace top --json` snapshot
RECORD_TYPES = (RECORD_EVENT, RECORD_META, RECORD_LOST, RECORD_OMITTED, RECORD_SUMMARY, RECORD_TOP)

U32 = 2 ** 32


class SchemaError(ValueError):
    """A record this conntrace cannot read; the message is one line for the user."""


@dataclass
class WindowSide:
    """One direction's view of the window (struct ip_ct_tcp_state)."""
    td_end: int = 0
    td_maxend: int = 0
    td_maxwin: int = 0
    td_maxack: int = 0
    td_scale: int = 0
    flags: int = 0


@dataclass
class Tuple:
    """One conntrack tuple; orig and reply differ when NAT is involved."""
    src: str = ""
    sport: int = 0
    dst: str = ""
    dport: int = 0


def _plain(value):
    """A WindowSide/Tuple (or an already plain dict) as a new dict."""
    return dict(value) if isinstance(value, dict) else dict(value.__dict__)


@dataclass
class Event:
    time: float                 # wall-clock seconds since the epoch
    netns: int                  # network namespace inode
    reason: str                 # one of REASONS
    verdict: str                # one of VERDICTS
    message: str                # the kernel's own text, as it would log it
    bound: Optional[int]        # the limit the value crossed (kernel's %u, or recomputed)
    distance: Optional[int]     # how far outside the bound, in bytes (None when not a window reason)
    family: int                 # 4 or 6 (0: the packet could not be read; no addresses)
    saddr: str                  # sender of the rejected segment
    sport: int
    daddr: str
    dport: int
    seq: int
    ack: int
    sack: Optional[int]         # highest SACK right edge, when the segment carried one
    win: int                    # raw window field
    win_scaled: int             # window << sender td_scale (0 on SYN)
    flags: str                  # e.g. "SA", "PA", "R"
    payload: int                # TCP payload length
    dir: str                    # "original" or "reply"
    ct_state: str               # TCP_STATES name
    ct_status: list = field(default_factory=list)    # IPS_* names
    orig: Tuple = field(default_factory=Tuple)
    reply: Tuple = field(default_factory=Tuple)
    seen: list = field(default_factory=lambda: [WindowSide(), WindowSide()])  # [original, reply]
    source: str = ""            # the probe rung/function that produced the event
    bound_recomputed: Optional[int] = None  # bound computed from `seen` (cross-check)

    @property
    def peer(self) -> str:
        """The sender of the rejected segment: what `top` groups by."""
        return self.saddr

    @property
    def is_window_reason(self) -> bool:
        return self.reason in WINDOW_REASONS

    def to_dict(self) -> dict:
        # Hand-written rather than dataclasses.asdict (a deep, generic copy): this runs once
        # per event on the NDJSON path, where asdict was two thirds of the cost.
        d = dict(self.__dict__)
        d["ct_status"] = list(self.ct_status)
        d["orig"] = _plain(self.orig)
        d["reply"] = _plain(self.reply)
        d["seen"] = [_plain(side) for side in self.seen]
        d["schema"] = SCHEMA_VERSION
        d["type"] = RECORD_EVENT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        """Build an Event from a decoded NDJSON record, refusing anything malformed.

        Raises SchemaError with a one-line message naming the offending field.  Unknown
        extra keys are ignored so that a newer conntrace writing schema 1 stays readable.
        """
        if not isinstance(d, dict):
            raise SchemaError(f"record is a JSON {type(d).__name__}, not an object")
        check_schema(d)
        rtype = d.get("type", RECORD_EVENT)
        if rtype != RECORD_EVENT:
            raise SchemaError(f"record type {rtype!r} is not an event")
        v = _Validator(d)
        family = v.choice("family", (0, 4, 6))
        unread = family == 0      # the probe could not read the packet: no addresses
        ev = cls(
            time=v.number("time"),
            netns=v.integer("netns", 0, 2 ** 64 - 1),
            reason=v.choice("reason", REASONS),
            verdict=v.choice("verdict", VERDICTS),
            message=v.string("message"),
            bound=v.integer("bound", 0, U32 - 1, optional=True),
            distance=v.integer("distance", -(U32 - 1), U32 - 1, optional=True),
            family=family,
            saddr=v.address("saddr", allow_empty=unread),
            sport=v.integer("sport", 0, 65535),
            daddr=v.address("daddr", allow_empty=unread),
            dport=v.integer("dport", 0, 65535),
            seq=v.integer("seq", 0, U32 - 1),
            ack=v.integer("ack", 0, U32 - 1),
            sack=v.integer("sack", 0, U32 - 1, optional=True),
            win=v.integer("win", 0, 65535),
            win_scaled=v.integer("win_scaled", 0, 2 ** 31),
            flags=v.string("flags"),
            payload=v.integer("payload", 0, 2 ** 32),
            dir=v.choice("dir", DIRECTIONS),
            ct_state=v.state("ct_state"),
            ct_status=v.string_list("ct_status", default=[]),
            orig=v.tuple("orig"),
            reply=v.tuple("reply"),
            seen=v.seen("seen"),
            source=v.string("source", default=""),
            bound_recomputed=v.integer("bound_recomputed", 0, U32 - 1, optional=True, default=None),
        )
        return ev


def check_schema(d: dict) -> int:
    """Return the record's schema version or raise SchemaError explaining what to do."""
    if "schema" not in d:
        raise SchemaError("no 'schema' field: not a conntrace record")
    schema = d["schema"]
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise SchemaError(f"'schema' must be an integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise SchemaError(f"schema {schema} was written by a newer conntrace; this one reads "
                          f"schema {SCHEMA_VERSION} (upgrade conntrace to read it)")
    if schema < 1:
        raise SchemaError(f"schema {schema} is older than any conntrace release; cannot read it")
    return schema


_MISSING = object()


class _Validator:
    """Typed field access over one record; every failure names the field."""

    def __init__(self, d: dict, prefix: str = ""):
        self.d = d
        self.prefix = prefix

    def _get(self, key, default=_MISSING):
        if key in self.d:
            return self.d[key]
        if default is not _MISSING:
            return default
        raise SchemaError(f"missing field '{self.prefix}{key}'")

    def _bad(self, key, want, value):
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return SchemaError(f"field '{self.prefix}{key}' must be {want}, got {shown}")

    def integer(self, key, lo, hi, optional=False, default=_MISSING):
        value = self._get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer" + (" or null" if optional else ""), value)
        if not lo <= value <= hi:
            raise self._bad(key, f"between {lo} and {hi}", value)
        return value

    def number(self, key):
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, "a finite number", value)
        if value < 0:
            raise self._bad(key, "a time in seconds since the epoch", value)
        return float(value)

    def string(self, key, default=_MISSING):
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def choice(self, key, allowed):
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value not in allowed:
            raise self._bad(key, "one of " + ", ".join(str(a) for a in allowed), value)
        return value

    def state(self, key):
        value = self._get(key)
        # decode prints an out-of-table state number as digits rather than guessing a name
        if isinstance(value, str) and (value in TCP_STATES or value.isdigit()):
            return value
        raise self._bad(key, "one of " + ", ".join(TCP_STATES), value)

    def address(self, key, allow_empty=False):
        value = self.string(key, default="" if allow_empty else _MISSING)
        if allow_empty and value == "":
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise self._bad(key, "an IP address", value) from None
        return value

    def string_list(self, key, default=_MISSING):
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise self._bad(key, "a list of strings", value)
        return list(value)

    def tuple(self, key) -> "Tuple":
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, "an object", value)
        v = _Validator(value, f"{self.prefix}{key}.")
        return Tuple(src=v.address("src", allow_empty=True), sport=v.integer("sport", 0, 65535, default=0),
                     dst=v.address("dst", allow_empty=True), dport=v.integer("dport", 0, 65535, default=0))

    def seen(self, key) -> list:
        value = self._get(key)
        if not isinstance(value, list) or len(value) != 2:
            raise self._bad(key, "a list of two objects (original, reply)", value)
        sides = []
        for i, side in enumerate(value):
            if not isinstance(side, dict):
                raise self._bad(f"{key}[{i}]", "an object", side)
            v = _Validator(side, f"{self.prefix}{key}[{i}].")
            sides.append(WindowSide(**{f.name: v.integer(f.name, 0, U32 - 1, default=0)
                                       for f in fields(WindowSide)}))
        # td_scale is 0..14 in the kernel; anything else is not from conntrack.
        for i, side in enumerate(sides):
            if side.td_scale > 14:
                raise self._bad(f"{key}[{i}].td_scale", "between 0 and 14", side.td_scale)
        return sides
