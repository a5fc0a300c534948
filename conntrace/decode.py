"""Raw BPF records -> Event: classification, the kernel's message, bounds.

Pure Python, no BPF: everything here is unit-tested on any machine.

* ``CtEvent`` (ctypes) mirrors ``struct ct_event`` in bpf/conntrace.h; the sizes and
  the ``#define`` constants are checked against the header (``check_header``).
* ``KERNEL_STRINGS`` lists every format / reason string the TCP tracker logs, in
  every era (reference §2), with its reason code and verdict.  The probe loads it
  into the kernel's ``fmt_table`` so in-kernel aggregation classifies the same way.
* ``render_message`` applies the kernel's format to the captured arguments, so the
  text is what the kernel logs (without the ``nf_ct_proto_6:`` prefix and packet dump).
* ``recompute_bound`` replays tcp_in_window's arithmetic (reference §2.4, §4.5) from
  ``seen`` and the packet, with the kernel's signed 32-bit ``before()/after()``.

Event conventions set here:

* ``bound`` is the kernel's own number when it printed one (6.1+; ``log->value`` on
  deferred kernels), else the recomputed one (pre-6.1).  OVERSHOT is the exception:
  the kernel prints a byte count, so that goes to ``distance`` and ``bound`` is the SEQ
  upper bound (sender.td_maxend + 1).
* ``distance`` is how many bytes lie outside the bound (>= 1 when the check failed).
* ``ct_status`` lists IPS_* names without the prefix ("SEEN_REPLY", "ASSURED", ...).
* ``message`` is the rendered kernel text without trailing blanks.
* ACK_OVER becomes SACK_OVER when the ACK number itself is within the bound (a SACK
  right edge was beyond it); the message stays the kernel's "ACK is over ...".
"""
from __future__ import annotations

import ctypes
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .events import Event, Tuple, WindowSide, TCP_STATES, WINDOW_REASONS

# ---- constants shared with bpf/conntrace.h --------------------------------------

REASON_CODES = [  # index == CT_R_* value
    "UNKNOWN", "SEQ_OVER", "ACK_OVER", "SACK_OVER", "SEQ_UNDER", "ACK_UNDER", "OVERSHOT",
    "INVALID_RST", "INVALID_STATE", "IGNORED_STATE", "CHALLENGE_ACK", "LOWER_TIMEOUT",
    "BAD_CHECKSUM", "TRUNCATED", "SHORT_PACKET", "BAD_FLAGS", "INVALID_NEW",
]
REASON_CODE = {name: i for i, name in enumerate(REASON_CODES)}
VERDICT_CODES = ["invalid", "ignored", "accepted-liberal", "info"]  # index == CT_V_*
VERDICT_CODE = {name: i for i, name in enumerate(VERDICT_CODES)}

SRC_TCP_LOG_VARIADIC, SRC_TCP_LOG_DEFERRED, SRC_CT_LOG, SRC_L4_LOG = 1, 2, 3, 4
SOURCES = {
    SRC_TCP_LOG_VARIADIC: "kprobe:nf_tcp_log_invalid (variadic)",
    SRC_TCP_LOG_DEFERRED: "kprobe:nf_tcp_log_invalid (deferred)",
    SRC_CT_LOG: "kprobe:nf_ct_l4proto_log_invalid",
    SRC_L4_LOG: "kprobe:nf_l4proto_log_invalid",
}

F_HAVE_CT, F_HAVE_VALUE, F_LIBERAL_SENDER, F_LIBERAL_SYSCTL = 0x01, 0x02, 0x04, 0x08
F_HAVE_PKT, F_HAVE_TCPH, F_VIA_PV, F_HAVE_KNOBS = 0x10, 0x20, 0x40, 0x80
DIR_UNKNOWN = 255
KEY_LEN = 32
EVENT_SIZE = 456
AGG_KEY_SIZE = 44

IP_CT_TCP_FLAG_SACK_PERM = 0x02
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
MAXACKWINCONST = 66000
TCP_CONNTRACK_SYN_SENT = 1

IPS_NAMES = ["EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT",
             "SEQ_ADJUST", "SRC_NAT_DONE", "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT",
             "TEMPLATE", "NAT_CLASH", "HELPER", "OFFLOAD", "HW_OFFLOAD"]

# deferred kernels: enum nf_tcp_invalid_log_type -> (reason, the 6.1+ format it stands for)
DEFERRED_TYPES = {
    1: ("OVERSHOT", "%u bytes more than expected"),
    2: ("SEQ_OVER", "SEQ is over upper bound %u (over the window of the receiver)"),
    3: ("ACK_OVER", "ACK is over upper bound %u (ACKed data not seen yet)"),
    4: ("SEQ_UNDER", "SEQ is under lower bound %u (already ACKed data retransmitted)"),
    5: ("ACK_UNDER", "ignored ACK under lower bound %u (possible overly delayed)"),
}


@dataclass(frozen=True)
class KernelString:
    text: str                 # the format (or, for "%s" window reasons, the argument)
    reason: str
    verdict: str              # verdict when logged through the generic helpers
    str_arg: Optional[int]    # which argument is the %s, if any
    era: str                  # where it comes from (reference §2)


KERNEL_STRINGS = [
    # window reasons, 4.19 - 6.0: nf_ct_l4proto_log_invalid(..., "%s", reason); all INVALID
    KernelString("SEQ is over the upper bound (over the window of the receiver)", "SEQ_OVER", "invalid", None, "<=6.0"),
    KernelString("SEQ is under the lower bound (already ACKed data retransmitted)", "SEQ_UNDER", "invalid", None, "<=6.0"),
    KernelString("ACK is over the upper bound (ACKed data not seen yet)", "ACK_OVER", "invalid", None, "<=6.0"),
    KernelString("ACK is under the lower bound (possible overly delayed ACK)", "ACK_UNDER", "invalid", None, "<=6.0"),
    KernelString("BUG", "UNKNOWN", "invalid", None, "<=6.0 (unreachable)"),
    # 5.19.9 / 6.0: INVALID; 6.1+: through nf_tcp_log_invalid, where ret decides
    KernelString("%u bytes more than expected", "OVERSHOT", "invalid", None, "5.19.9+"),
    # window reasons, 6.1+: nf_tcp_log_invalid(..., ret, fmt, value)
    KernelString("SEQ is over upper bound %u (over the window of the receiver)", "SEQ_OVER", "invalid", None, "6.1+"),
    KernelString("ACK is over upper bound %u (ACKed data not seen yet)", "ACK_OVER", "invalid", None, "6.1+"),
    KernelString("SEQ is under lower bound %u (already ACKed data retransmitted)", "SEQ_UNDER", "ignored", None, "6.1+"),
    KernelString("ignored ACK under lower bound %u (possible overly delayed)", "ACK_UNDER", "ignored", None, "6.1+"),
    # state machine
    KernelString("invalid packet ignored in state %s ", "IGNORED_STATE", "ignored", 0, "<=5.11"),
    KernelString("packet (index %d) in dir %d ignored, state %s", "IGNORED_STATE", "ignored", 2, "5.12+"),
    KernelString("invalid state", "INVALID_STATE", "invalid", None, "<=5.18"),
    KernelString("packet (index %d) in dir %d invalid, state %s", "INVALID_STATE", "invalid", 2, "5.19+"),
    KernelString("challenge-ack ignored", "CHALLENGE_ACK", "info", None, "all"),
    KernelString("invalid rst", "INVALID_RST", "invalid", None, "all"),
    KernelString("packet (index %d, dir %d) response for index %d lower timeout to %u",
                 "LOWER_TIMEOUT", "info", None, "6.1 - pre-defer"),
    KernelString("lowered timeout to UNACK", "LOWER_TIMEOUT", "info", None, "deferred"),
    # tcp_error / tcp_new: nf_l4proto_log_invalid(..., IPPROTO_TCP, "%s", msg)
    KernelString("short packet", "SHORT_PACKET", "invalid", None, "4.19"),
    KernelString("truncated packet", "TRUNCATED", "invalid", None, "all"),
    KernelString("bad checksum", "BAD_CHECKSUM", "invalid", None, "all"),
    KernelString("invalid tcp flag combination", "BAD_FLAGS", "invalid", None, "all"),
    KernelString("invalid new", "INVALID_NEW", "invalid", None, "6.7+"),
]


def fmt_key(text: str | bytes) -> bytes:
    """The fmt_table key: the first KEY_LEN-1 bytes of the text, NUL padded."""
    raw = text.encode() if isinstance(text, str) else text
    raw = raw.split(b"\0", 1)[0][:KEY_LEN - 1]
    return raw.ljust(KEY_LEN, b"\0")


_BY_KEY = {fmt_key(s.text): s for s in KERNEL_STRINGS}

# Wording we have not seen verbatim (other kernels, vendor trees): match by meaning.
_FUZZY = [
    (re.compile(r"bytes more than expected"), "OVERSHOT", "invalid"),
    (re.compile(r"^SEQ is over"), "SEQ_OVER", "invalid"),
    (re.compile(r"^SEQ is under"), "SEQ_UNDER", "invalid"),
    (re.compile(r"^ACK is over"), "ACK_OVER", "invalid"),
    (re.compile(r"ACK (is )?under"), "ACK_UNDER", "invalid"),
    (re.compile(r"invalid rst"), "INVALID_RST", "invalid"),
    (re.compile(r"lower(ed)? timeout"), "LOWER_TIMEOUT", "info"),
    (re.compile(r"challenge"), "CHALLENGE_ACK", "info"),
    (re.compile(r"ignored.*state|state.*ignored"), "IGNORED_STATE", "ignored"),
    (re.compile(r"invalid.*state|state.*invalid"), "INVALID_STATE", "invalid"),
    (re.compile(r"checksum"), "BAD_CHECKSUM", "invalid"),
    (re.compile(r"truncated"), "TRUNCATED", "invalid"),
    (re.compile(r"short packet"), "SHORT_PACKET", "invalid"),
    (re.compile(r"flag combination"), "BAD_FLAGS", "invalid"),
    (re.compile(r"invalid new"), "INVALID_NEW", "invalid"),
]


def classify_text(fmt: str, string: str = "") -> tuple[str, str]:
    """(reason, verdict) for a kernel format and its %s argument.

    ``("%s", "SEQ is over the upper bound ...")`` classifies by the argument; any
    other format by itself.  The verdict is the one for the generic log helpers
    (the variadic nf_tcp_log_invalid's ``ret`` and be_liberal override it).
    """
    text = string if fmt == "%s" else fmt
    known = _BY_KEY.get(fmt_key(text))
    if known:
        return known.reason, known.verdict
    for pattern, reason, verdict in _FUZZY:
        if pattern.search(text):
            return reason, verdict
    return "UNKNOWN", "invalid"


def fmt_table_entries() -> list[tuple[bytes, int, int, int]]:
    """Rows for the kernel's fmt_table: (key, reason code, verdict code, str_arg or 255)."""
    return [(fmt_key(s.text), REASON_CODE[s.reason], VERDICT_CODE[s.verdict],
             255 if s.str_arg is None else s.str_arg) for s in KERNEL_STRINGS]


# ---- the record ------------------------------------------------------------------

class CtTcpState(ctypes.Structure):
    _fields_ = [("td_end", ctypes.c_uint32), ("td_maxend", ctypes.c_uint32),
                ("td_maxwin", ctypes.c_uint32), ("td_maxack", ctypes.c_uint32),
                ("td_scale", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2)]


class CtTcp(ctypes.Structure):
    _fields_ = [("seen", CtTcpState * 2), ("state", ctypes.c_uint8), ("last_dir", ctypes.c_uint8),
                ("retrans", ctypes.c_uint8), ("last_index", ctypes.c_uint8),
                ("last_seq", ctypes.c_uint32), ("last_ack", ctypes.c_uint32),
                ("last_end", ctypes.c_uint32), ("last_win", ctypes.c_uint16),
                ("last_wscale", ctypes.c_uint8), ("last_flags", ctypes.c_uint8)]


class CtTuple(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint8 * 16), ("sport", ctypes.c_uint16), ("l3num", ctypes.c_uint16),
                ("dst", ctypes.c_uint8 * 16), ("dport", ctypes.c_uint16),
                ("protonum", ctypes.c_uint8), ("dir", ctypes.c_uint8)]


class CtEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64), ("ct_status", ctypes.c_uint64), ("args", ctypes.c_uint64 * 4),
        ("netns", ctypes.c_uint32), ("value", ctypes.c_uint32),
        ("skb_len", ctypes.c_uint32), ("skb_data_len", ctypes.c_uint32),
        ("data_off", ctypes.c_uint16), ("nh_off", ctypes.c_uint16), ("th_off", ctypes.c_uint16),
        ("source", ctypes.c_uint8), ("reason", ctypes.c_uint8), ("verdict", ctypes.c_uint8),
        ("ret", ctypes.c_uint8), ("dir", ctypes.c_uint8), ("ctinfo", ctypes.c_uint8),
        ("flags", ctypes.c_uint8), ("tcph_len", ctypes.c_uint8),
        ("knob_be_liberal", ctypes.c_uint8), ("knob_loose", ctypes.c_uint8),
        ("knob_ignore_invalid_rst", ctypes.c_uint8), ("knob_log_invalid", ctypes.c_uint8),
        ("knob_checksum", ctypes.c_uint8), ("log_type", ctypes.c_uint8),
        ("tcp", CtTcp), ("orig", CtTuple), ("reply", CtTuple),
        ("iph", ctypes.c_uint8 * 40), ("tcph", ctypes.c_uint8 * 60),
        ("fmt", ctypes.c_char * 64), ("str", ctypes.c_char * 64), ("pad", ctypes.c_uint8 * 4),
    ]


class CtAggKey(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint32), ("family", ctypes.c_uint8), ("reason", ctypes.c_uint8),
                ("verdict", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("peer", ctypes.c_uint8 * 16), ("local", ctypes.c_uint8 * 16),
                ("lport", ctypes.c_uint16), ("pad2", ctypes.c_uint16)]


class CtAggVal(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("first_ns", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


assert ctypes.sizeof(CtTcp) == 60 and ctypes.sizeof(CtTuple) == 40
assert ctypes.sizeof(CtEvent) == EVENT_SIZE, ctypes.sizeof(CtEvent)
assert ctypes.sizeof(CtAggKey) == AGG_KEY_SIZE


def header_constants(path: str | Path) -> dict[str, int]:
    """Every ``#define NAME number`` in bpf/conntrace.h."""
    out = {}
    for m in re.finditer(r"^#define\s+(CT_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", Path(path).read_text(), re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def check_header(path: str | Path) -> None:
    """Raise ValueError when bpf/conntrace.h and this module disagree (sizes, codes)."""
    c = header_constants(path)
    want = {"CT_EVENT_SIZE": EVENT_SIZE, "CT_AGG_KEY_SIZE": AGG_KEY_SIZE, "CT_KEY_LEN": KEY_LEN,
            "CT_DIR_UNKNOWN": DIR_UNKNOWN, "CT_SRC_TCP_LOG_VARIADIC": SRC_TCP_LOG_VARIADIC,
            "CT_SRC_TCP_LOG_DEFERRED": SRC_TCP_LOG_DEFERRED, "CT_SRC_CT_LOG": SRC_CT_LOG,
            "CT_SRC_L4_LOG": SRC_L4_LOG, "CT_F_HAVE_CT": F_HAVE_CT, "CT_F_HAVE_VALUE": F_HAVE_VALUE,
            "CT_F_LIBERAL_SENDER": F_LIBERAL_SENDER, "CT_F_LIBERAL_SYSCTL": F_LIBERAL_SYSCTL,
            "CT_F_HAVE_PKT": F_HAVE_PKT, "CT_F_HAVE_TCPH": F_HAVE_TCPH, "CT_F_VIA_PV": F_VIA_PV,
            "CT_F_HAVE_KNOBS": F_HAVE_KNOBS}
    want.update({f"CT_R_{n}": i for i, n in enumerate(REASON_CODES)})
    want.update({"CT_V_INVALID": 0, "CT_V_IGNORED": 1, "CT_V_LIBERAL": 2, "CT_V_INFO": 3})
    bad = [f"{k}={c.get(k)} (Python {v})" for k, v in want.items() if c.get(k) != v]
    if bad:
        raise ValueError("bpf/conntrace.h and conntrace/decode.py disagree: " + ", ".join(bad))


# ---- 32-bit sequence arithmetic (include/net/tcp.h before()/after()) ---------------

def s32(x: int) -> int:
    """Two's-complement 32-bit value of x (what the kernel's (__s32) cast gives)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def before(a: int, b: int) -> bool:
    return s32(a - b) < 0


def after(a: int, b: int) -> bool:
    return before(b, a)


# ---- the kernel's message ----------------------------------------------------------

_SPEC = re.compile(r"%(%|pV|[-+ #0]*\d*(?:\.\d+)?(?:hh|h|ll|l|z)?[diuxXsc])")


def render_message(fmt: str, args=(), string: Optional[str] = None) -> str:
    """Apply a kernel printk format to raw 64-bit argument slots.

    Integer conversions see the C-promoted value: ``%u``/``%d``/``%x`` take the low
    32 bits (the upper half of a vararg slot holding an int is junk), ``%lu``/``%ld``
    all 64.  ``%s`` consumes its slot and prints ``string`` (read by the probe).
    """
    out, pos, i = [], 0, 0
    args = list(args)
    for m in _SPEC.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        spec = m.group(1)
        if spec == "%":
            out.append("%")
            continue
        raw = args[i] if i < len(args) else 0
        i += 1
        conv = spec[-1]
        if spec == "pV" or conv == "s":
            out.append(string if string is not None else "?")
            continue
        wide = "l" in spec or "z" in spec
        v = raw & (0xFFFFFFFFFFFFFFFF if wide else 0xFFFFFFFF)
        if conv in "di":
            v = v - (1 << 64) if wide and v >> 63 else (s32(v) if not wide else v)
            out.append(str(v))
        elif conv == "u":
            out.append(str(v))
        elif conv == "x":
            out.append(format(v, "x"))
        elif conv == "X":
            out.append(format(v, "X"))
        elif conv == "c":
            out.append(chr(v & 0xFF))
    out.append(fmt[pos:])
    return "".join(out)


# ---- the segment -------------------------------------------------------------------

TCP_FLAG_LETTERS = [(0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "A"),
                    (0x20, "U"), (0x40, "E"), (0x80, "C")]
TH_FIN, TH_SYN, TH_RST, TH_ACK = 0x01, 0x02, 0x04, 0x10


def flags_str(flags: int) -> str:
    """TCP flags as letters, e.g. 0x12 -> "SA", 0x18 -> "PA"."""
    return "".join(letter for bit, letter in TCP_FLAG_LETTERS if flags & bit)


@dataclass
class Segment:
    sport: int
    dport: int
    seq: int
    ack: int
    doff: int
    flags: int
    win: int
    sack_edges: list          # right edges of the first SACK option, in order
    wscale: Optional[int]


def parse_tcp(raw: bytes) -> Optional[Segment]:
    """TCP header (and options, when present in raw) -> Segment; None if < 20 bytes."""
    if len(raw) < 20:
        return None
    sport, dport, seq, ack, off, flags, win = struct.unpack_from("!HHIIBBH", raw)
    doff = off >> 4
    opts = raw[20:min(doff * 4, len(raw))]
    sack, wscale = [], None
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts):
            break
        size = opts[i + 1]
        if size < 2 or i + size > len(opts):
            break
        body = opts[i + 2:i + size]
        if kind == 3 and size == 3:
            wscale = min(body[0], 14)
        elif kind == 5 and size >= 10 and (size - 2) % 8 == 0 and not sack:
            sack = [struct.unpack_from("!I", body, j + 4)[0] for j in range(0, size - 2, 8)]
        i += size
    return Segment(sport, dport, seq, ack, doff, flags, win, sack, wscale)


def highest_sack(ack: int, edges: list) -> int:
    """tcp_sack(): the highest right edge, by after(), starting from the ACK number."""
    best = ack
    for edge in edges:
        if after(edge, best):
            best = edge
    return best


# ---- bounds (reference §2.4 and §4.5) ----------------------------------------------

def maxackwindow(sender: WindowSide) -> int:
    return max(sender.td_maxwin, MAXACKWINCONST)


def kernel_numbers(sender: WindowSide, receiver: WindowSide, seq: int, ack: int, sack_edges: list,
                   flags: int, payload: int, state: int = 0) -> tuple[int, int, int]:
    """(seq, end, sack) as tcp_in_window computes them (reference §4.5), mod 2^32."""
    end = seq + payload + (1 if flags & TH_SYN else 0) + (1 if flags & TH_FIN else 0)
    sack = ack
    if receiver.flags & IP_CT_TCP_FLAG_SACK_PERM:
        sack = highest_sack(ack, sack_edges)
    if not flags & TH_ACK:
        ack = sack = receiver.td_end
    elif flags & TH_RST and ack == 0:
        ack = sack = receiver.td_end
    if flags & TH_RST and seq == 0 and state == TCP_CONNTRACK_SYN_SENT:
        seq = end = sender.td_end
    m = 0xFFFFFFFF
    return seq & m, end & m, sack & m


def recompute_bound(reason: str, sender: WindowSide, receiver: WindowSide, seq: int, ack: int,
                    sack_edges: list, flags: int, payload: int, state: int = 0
                    ) -> tuple[Optional[int], Optional[int]]:
    """(bound, distance) for a window reason, replaying tcp_in_window on ``seen``.

    bound is the value the kernel prints (6.1+) for that check: the first
    out-of-range value.  SEQ_OVER: seq had to be < sender.td_maxend + 1.
    ACK_OVER/SACK_OVER: the (S)ACK had to be < receiver.td_end + 1.  SEQ_UNDER: end
    had to be > sender.td_end - receiver.td_maxwin - 1.  ACK_UNDER: the (S)ACK had
    to be > receiver.td_end - max(sender.td_maxwin, 66000) - 1.  OVERSHOT: bound is
    the SEQ upper bound and distance is the kernel's "%u bytes more than expected",
    end - sender.td_maxend + 1.  distance: bytes outside the bound, >= 1 when the
    check failed (signed 32-bit).  (None, None) for other reasons.  NAT sequence
    adjustment (IPS_SEQ_ADJUST) is not replayed.
    """
    if reason not in WINDOW_REASONS:
        return None, None
    seq, end, sack = kernel_numbers(sender, receiver, seq, ack, sack_edges, flags, payload, state)
    m = 0xFFFFFFFF
    if reason == "SEQ_OVER":
        bound = (sender.td_maxend + 1) & m
        return bound, s32(seq - bound) + 1
    if reason == "OVERSHOT":
        return (sender.td_maxend + 1) & m, s32(end - sender.td_maxend + 1)
    if reason in ("ACK_OVER", "SACK_OVER"):
        bound = (receiver.td_end + 1) & m
        return bound, s32(sack - bound) + 1
    if reason == "SEQ_UNDER":
        bound = (sender.td_end - receiver.td_maxwin - 1) & m
        return bound, s32(bound - end) + 1
    if reason == "ACK_UNDER":
        bound = (receiver.td_end - maxackwindow(sender) - 1) & m
        return bound, s32(bound - sack) + 1
    return None, None


def distance_from_bound(reason: str, bound: int, seq: int, sack: int, end: int) -> Optional[int]:
    """Bytes outside a kernel-printed bound (same conventions as recompute_bound)."""
    if reason == "SEQ_OVER":
        return s32(seq - bound) + 1
    if reason in ("ACK_OVER", "SACK_OVER"):
        return s32(sack - bound) + 1
    if reason == "SEQ_UNDER":
        return s32(bound - end) + 1
    if reason == "ACK_UNDER":
        return s32(bound - sack) + 1
    return None


# ---- record -> Event ---------------------------------------------------------------

def _addr(raw: bytes, family: int) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, bytes(raw[:16]))
    return ""


def _family_of_l3num(l3num: int) -> int:
    return {2: 4, 10: 6}.get(l3num, 0)


def _tuple(t: CtTuple) -> Tuple:
    fam = _family_of_l3num(t.l3num)
    return Tuple(src=_addr(bytes(t.src), fam), sport=socket.ntohs(t.sport),
                 dst=_addr(bytes(t.dst), fam), dport=socket.ntohs(t.dport))


def _side(s: CtTcpState) -> WindowSide:
    return WindowSide(td_end=s.td_end, td_maxend=s.td_maxend, td_maxwin=s.td_maxwin,
                      td_maxack=s.td_maxack, td_scale=s.td_scale, flags=s.flags)


def parse_record(raw: bytes) -> CtEvent:
    """bytes from the ring buffer -> CtEvent (copied)."""
    if len(raw) < EVENT_SIZE:
        raise ValueError(f"short record: {len(raw)} < {EVENT_SIZE} bytes")
    return CtEvent.from_buffer_copy(raw[:EVENT_SIZE])


def record_knobs(rec: CtEvent) -> Optional[dict]:
    """The per-netns sysctls the probe read with this event (None if unread)."""
    if not rec.flags & F_HAVE_KNOBS:
        return None
    return {"be_liberal": rec.knob_be_liberal, "loose": rec.knob_loose,
            "ignore_invalid_rst": None if rec.knob_ignore_invalid_rst == 255 else rec.knob_ignore_invalid_rst,
            "log_invalid": rec.knob_log_invalid, "checksum": rec.knob_checksum}


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_record(raw: bytes | CtEvent, clock_offset: float = 0.0) -> Event:
    """One BPF record -> Event.

    clock_offset converts bpf_ktime_get_ns (CLOCK_MONOTONIC) to wall clock:
    ``time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)`` taken at start.
    """
    rec = raw if isinstance(raw, CtEvent) else parse_record(raw)
    have_ct = bool(rec.flags & F_HAVE_CT)
    fmt, string = _cstr(rec.fmt), _cstr(rec.str)
    args = list(rec.args)

    # reason, verdict, message
    value: Optional[int] = rec.value if rec.flags & F_HAVE_VALUE else None
    if rec.source == SRC_TCP_LOG_DEFERRED:
        reason, dfmt = DEFERRED_TYPES.get(rec.log_type, ("UNKNOWN", f"unknown log type {rec.log_type} %u"))
        verdict = "invalid" if rec.log_type in (2, 3) else "ignored"
        message = render_message(dfmt, [rec.value])
    else:
        reason, verdict = classify_text(fmt, string)
        if reason in ("IGNORED_STATE", "INVALID_STATE") and not string and have_ct:
            string = TCP_STATES[rec.tcp.state] if rec.tcp.state < len(TCP_STATES) else str(rec.tcp.state)
        # trailing blanks (5.10's "invalid packet ignored in state %s ") carry nothing and
        # vanish in the kernel's own log line, which appends " IN=... " anyway
        message = (string if fmt == "%s" else render_message(fmt, args, string)).rstrip()
        if rec.source == SRC_TCP_LOG_VARIADIC:
            verdict = "invalid" if rec.ret == 1 else "ignored"
            if rec.flags & (F_LIBERAL_SENDER | F_LIBERAL_SYSCTL):
                verdict = "accepted-liberal"
        elif rec.source == SRC_CT_LOG and reason == "OVERSHOT":
            value = args[0] & 0xFFFFFFFF      # 5.19.9 - 6.0: "%u bytes more than expected"

    # addresses and the segment
    family, saddr, daddr, l3len = 0, "", "", 0
    iph = bytes(rec.iph)
    if rec.flags & F_HAVE_PKT:
        version = iph[0] >> 4
        if version == 4:
            family, saddr, daddr = 4, _addr(iph[12:16], 4), _addr(iph[16:20], 4)
        elif version == 6:
            family, saddr, daddr = 6, _addr(iph[8:24], 6), _addr(iph[24:40], 6)
    seg = parse_tcp(bytes(rec.tcph)[:rec.tcph_len]) if rec.flags & F_HAVE_TCPH else None

    dir_ = rec.dir if rec.dir in (0, 1) else 0
    orig, reply = _tuple(rec.orig), _tuple(rec.reply)
    if not family and have_ct:
        family = _family_of_l3num(rec.orig.l3num)
        t = orig if dir_ == 0 else reply
        saddr, daddr = t.src, t.dst
    seen = [_side(rec.tcp.seen[0]), _side(rec.tcp.seen[1])]
    sender, receiver = seen[dir_], seen[1 - dir_]

    payload = 0
    if seg is not None:
        if rec.th_off != 0xFFFF and rec.th_off >= rec.data_off:
            dataoff = rec.th_off - rec.data_off       # offset of TCP from skb->data
            payload = max(0, rec.skb_len - dataoff - seg.doff * 4)
        elif family == 4:
            payload = max(0, struct.unpack_from("!H", iph, 2)[0] - (iph[0] & 0xF) * 4 - seg.doff * 4)

    sport = seg.sport if seg else (orig.sport if dir_ == 0 else reply.sport)
    dport = seg.dport if seg else (orig.dport if dir_ == 0 else reply.dport)
    seq = seg.seq if seg else 0
    ack = seg.ack if seg else 0
    tflags = seg.flags if seg else 0
    sack_edge = highest_sack(ack, seg.sack_edges) if seg and seg.sack_edges else None
    win = seg.win if seg else 0
    win_scaled = 0 if tflags & TH_SYN else (win << sender.td_scale)

    # ACK over the bound with the ACK number in range: the SACK edge did it
    if reason == "ACK_OVER" and seg is not None and tflags & TH_ACK:
        limit = (value - 1) & 0xFFFFFFFF if value is not None else receiver.td_end
        if have_ct or value is not None:
            if not after(ack, limit):
                reason = "SACK_OVER"

    bound = distance = bound_re = None
    if reason in WINDOW_REASONS and seg is not None and have_ct:
        bound_re, dist_re = recompute_bound(reason, sender, receiver, seq, ack, seg.sack_edges,
                                            tflags, payload, rec.tcp.state)
        if reason == "OVERSHOT":
            bound, distance = bound_re, (value if value is not None else dist_re)
        elif value is not None:
            bound = value
            seq_k, end_k, sack_k = kernel_numbers(sender, receiver, seq, ack, seg.sack_edges,
                                                  tflags, payload, rec.tcp.state)
            distance = distance_from_bound(reason, bound, seq_k, sack_k, end_k)
        else:
            bound, distance = bound_re, dist_re
    elif reason in WINDOW_REASONS and value is not None and reason != "OVERSHOT":
        bound = value
    elif reason == "OVERSHOT" and value is not None:
        distance = value

    state = rec.tcp.state if have_ct else 0
    return Event(
        time=rec.ts_ns / 1e9 + clock_offset,
        netns=rec.netns,
        reason=reason,
        verdict=verdict,
        message=message,
        bound=bound,
        distance=distance,
        family=family,
        saddr=saddr,
        sport=sport,
        daddr=daddr,
        dport=dport,
        seq=seq,
        ack=ack,
        sack=sack_edge,
        win=win,
        win_scaled=win_scaled,
        flags=flags_str(tflags),
        payload=payload,
        dir="reply" if dir_ == 1 else "original",
        ct_state=TCP_STATES[state] if state < len(TCP_STATES) else str(state),
        ct_status=[n for i, n in enumerate(IPS_NAMES) if rec.ct_status >> i & 1] if have_ct else [],
        orig=orig,
        reply=reply,
        seen=seen,
        source=SOURCES.get(rec.source, f"source {rec.source}"),
        bound_recomputed=bound_re,
    )


# ---- aggregation rows --------------------------------------------------------------

@dataclass
class AggregateRow:
    """One in-kernel aggregation entry (Probe.read_aggregates)."""
    netns: int
    family: int                 # 4, 6 (0: the packet could not be read)
    peer: str                   # sender of the rejected segments
    local: str                  # their destination address
    local_port: int
    peer_port: Optional[int]    # not part of the key (None): random source ports would flood the map
    reason: str
    verdict: str
    packets: int
    bytes: int
    first_seen: float           # wall clock
    last_seen: float


def decode_aggregate(key: CtAggKey, val: CtAggVal, clock_offset: float = 0.0) -> AggregateRow:
    lport = socket.ntohs(key.lport)
    return AggregateRow(
        netns=key.netns, family=key.family,
        peer=_addr(bytes(key.peer), key.family), local=_addr(bytes(key.local), key.family),
        local_port=lport, peer_port=None,
        reason=REASON_CODES[key.reason] if key.reason < len(REASON_CODES) else "UNKNOWN",
        verdict=VERDICT_CODES[key.verdict] if key.verdict < len(VERDICT_CODES) else "invalid",
        packets=val.packets, bytes=val.bytes,
        first_seen=val.first_ns / 1e9 + clock_offset, last_seen=val.last_ns / 1e9 + clock_offset)
