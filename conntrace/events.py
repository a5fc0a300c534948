"""The event every stage agrees on: one TCP segment conntrack rejected or ignored.

probe/decode build Events from BPF records, aggregate/advise/render/report consume
them, and the NDJSON files written by `--write`/`--json` are Events serialised with
`to_dict()`.  Bump SCHEMA_VERSION whenever a field changes meaning or disappears.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
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


@dataclass
class Event:
    time: float                 # wall-clock seconds since the epoch
    netns: int                  # network namespace inode
    reason: str                 # one of REASONS
    verdict: str                # one of VERDICTS
    message: str                # the kernel's own text, as it would log it
    bound: Optional[int]        # the limit the value crossed (kernel's %u, or recomputed)
    distance: Optional[int]     # how far outside the bound, in bytes (None when not a window reason)
    family: int                 # 4 or 6
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        return d
