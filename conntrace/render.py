"""Human output: the trace table (streamed, fixed widths), top tables, numbers in words.

Everything here returns strings; the CLI decides where they go.  Lines stay within
WIDTH columns so a 120-column terminal never wraps.
"""
from __future__ import annotations

import re
import sys
import textwrap
import time as _time
from typing import Iterable, Optional

from tabulate import tabulate

from .events import (Event, STATE_SHORT, U32, TCP_FLAG_WINDOW_SCALE, TCP_FLAG_BE_LIBERAL,
                     TCP_FLAG_MAXACK_SET, REASONS)

WIDTH = 120


def _group_sep() -> str:
    # A thin space groups digits without looking like a column break; fall back to a
    # plain space where stdout cannot encode it (e.g. an ASCII-only pipe).
    enc = (getattr(sys.stdout, "encoding", None) or "ascii")
    try:
        "\u2009".encode(enc)
        return "\u2009"
    except (UnicodeEncodeError, LookupError):
        return " "


def fmt_int(n, sep: Optional[str] = None) -> str:
    """12345678 -> '12 345 678' (thin spaces); None -> '-'."""
    if n is None:
        return "-"
    sep = _group_sep() if sep is None else sep
    s = f"{abs(int(n)):,}".replace(",", sep)
    return ("-" if n < 0 else "") + s


def fmt_rate(r: float) -> str:
    if r >= 100:
        return fmt_int(round(r))
    if r >= 10:
        return f"{r:.0f}"
    return f"{r:.1f}"


def fmt_time(t: float) -> str:
    return _time.strftime("%H:%M:%S", _time.localtime(t))


def fmt_datetime(t: float) -> str:
    return _time.strftime("%Y-%m-%d %H:%M:%S %Z", _time.localtime(t))


def fmt_ago(t: float, now: float) -> str:
    if not t:
        return "-"
    d = max(now - t, 0)
    if d < 1:
        return "now"
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.0f}h ago"


def endpoint(addr: str, port: int) -> str:
    if not addr:
        return "?"           # the probe could not read the packet (family 0)
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def elide(s: str, width: int) -> str:
    """Keep both ends of a long address: '2001:db8:…:1]:443'."""
    if len(s) <= width:
        return s
    keep = width - 1
    head = keep // 2
    return s[:head] + "…" + s[len(s) - (keep - head):]


# ---- numbers the kernel compared ------------------------------------------------------

def _u32_diff(a: int, b: int) -> int:
    """a - b modulo 2^32, as a signed distance (the kernel's before()/after())."""
    d = (a - b) % U32
    return d - U32 if d >= 2 ** 31 else d


def checked_value(ev: Event):
    """(field name, value) the reason is about: seq for SEQ_*, the SACK edge for SACK_OVER..."""
    r = ev.reason
    if r in ("SEQ_OVER", "SEQ_UNDER", "INVALID_RST"):
        return "seq", ev.seq
    if r == "OVERSHOT":
        return "end", (ev.seq + ev.payload) % U32
    if r in ("ACK_OVER", "ACK_UNDER"):
        return "ack", ev.ack
    if r == "SACK_OVER":
        return "sack", ev.sack if ev.sack is not None else ev.ack
    return "seq", ev.seq


def off_by(ev: Event) -> Optional[int]:
    """Bytes outside the bound (>= 1 when the check failed), as decode computes them.

    The bound is the first out-of-range value, so a value equal to it is 1 byte out.
    """
    if ev.distance is not None:
        return ev.distance
    if ev.bound is None or ev.reason not in ("SEQ_OVER", "ACK_OVER", "SACK_OVER", "SEQ_UNDER",
                                             "ACK_UNDER"):
        return None
    _, value = checked_value(ev)
    if ev.reason in ("SEQ_UNDER", "ACK_UNDER"):
        return _u32_diff(ev.bound, value) + 1
    return _u32_diff(value, ev.bound) + 1


def explain(ev: Event) -> str:
    """One sentence with the event's numbers, for people who do not read tcp_in_window."""
    g = fmt_int
    d = off_by(ev)
    dist = g(abs(d)) if d is not None else "?"
    b = g(ev.bound) if ev.bound is not None else "?"
    sender = "original" if ev.dir == "original" else "reply"
    receiver_side = ev.seen[1 if ev.dir == "original" else 0]
    sender_side = ev.seen[0 if ev.dir == "original" else 1]
    r = ev.reason
    edge = g((ev.bound - 1) % U32) if ev.bound is not None else "?"
    if r == "SEQ_OVER":
        return (f"seq {ev.seq} lies {dist} bytes beyond the receiver's window edge {edge} "
                f"(the {sender} side may send up to td_maxend {sender_side.td_maxend}).")
    if r == "OVERSHOT":
        return (f"the segment ({g(ev.payload)} bytes from seq {ev.seq}) ends {dist} bytes past "
                f"the receiver's window edge {b}.")
    if r == "ACK_OVER":
        return (f"ack {ev.ack} acknowledges {dist} bytes the other side never sent "
                f"(its highest sequence number seen is td_end {receiver_side.td_end}).")
    if r == "SACK_OVER":
        return (f"ack {ev.ack} is in range, but the SACK block's right edge {ev.sack} lies {dist} "
                f"bytes beyond the data the other side sent (bound {b}).")
    if r == "SEQ_UNDER":
        return (f"the segment ends {dist} bytes before the lower bound {b}: data already "
                f"acknowledged, retransmitted late.")
    if r == "ACK_UNDER":
        return (f"ack {ev.ack} is {dist} bytes behind the lower bound {b}: an overly delayed ACK.")
    if r == "INVALID_RST":
        maxack = receiver_side.td_maxack
        behind = _u32_diff(maxack, ev.seq)
        return (f"RST seq {ev.seq} is {g(behind)} bytes behind the highest ACK {maxack} the other "
                f"side sent, so conntrack does not believe it.")
    if r in ("INVALID_STATE", "IGNORED_STATE"):
        return (f"a segment with flags {ev.flags or 'none'} is not allowed in state {ev.ct_state} "
                f"({ev.dir} direction).")
    if r == "BAD_CHECKSUM":
        return "the TCP checksum did not match at PRE_ROUTING."
    return REASONS.get(r, r) + "."


# ---- the trace table -----------------------------------------------------------------

VERDICT_SHORT = {"invalid": "invalid", "ignored": "ignored", "accepted-liberal": "liberal",
                 "info": "info"}

# (header, width, align) -- widths add up to <= WIDTH with single-space separators
TRACE_COLUMNS = (("TIME", 8, "<"), ("REASON", 13, "<"), ("VERDICT", 7, "<"),
                 ("PEER", 21, ">"), ("", 2, "<"), ("LOCAL", 21, "<"), ("ST", 2, "<"),
                 ("FLG", 3, "<"), ("SEQ/ACK/SACK", 15, ">"), ("BOUND", 10, ">"),
                 ("OFF-BY", 8, ">"))


def _row(cells) -> str:
    parts = []
    for (hdr, width, align), cell in zip(TRACE_COLUMNS, cells):
        cell = str(cell)
        parts.append(f"{cell:{align}{width}}")
    return " ".join(parts).rstrip()


def trace_header() -> str:
    return _row([c[0] for c in TRACE_COLUMNS])


def trace_line(ev: Event) -> str:
    name, value = checked_value(ev)
    d = off_by(ev)
    return _row([
        fmt_time(ev.time),
        ev.reason,
        VERDICT_SHORT.get(ev.verdict, ev.verdict),
        elide(endpoint(ev.saddr, ev.sport), 21),
        "->",
        elide(endpoint(ev.daddr, ev.dport), 21),
        STATE_SHORT.get(ev.ct_state, ev.ct_state[:2]),
        (ev.flags or "-")[:3],
        f"{name} {value}",
        "-" if ev.bound is None else str(ev.bound),
        _compact_distance(d),
    ])


def _compact_distance(d: Optional[int]) -> str:
    """Exact up to 999 999 bytes, then MiB/GiB so the column stays 8 wide (JSON is exact)."""
    if d is None:
        return "-"
    sign = "+" if d > 0 else "-" if d < 0 else ""
    a = abs(d)
    if a < 1_000_000:
        return sign + fmt_int(a)
    if a < 2 ** 30:
        return f"{sign}{a / 2 ** 20:.0f}MiB"
    return f"{sign}{a / 2 ** 30:.1f}GiB"


def lost_line(count: int, total: int) -> str:
    return (f"!! {fmt_int(count)} events lost between kernel and user space "
            f"({fmt_int(total)} so far); the kernel's counts stay exact (footer, `conntrace top`)")


def trace_footer(shown: int, filtered: int, lost: int, seconds: float) -> str:
    parts = [f"{fmt_int(shown)} event{'s' if shown != 1 else ''} shown"]
    if filtered:
        parts.append(f"{fmt_int(filtered)} filtered out")
    parts.append(f"{fmt_int(lost)} lost" + (" (user space could not keep up)" if lost else ""))
    parts.append(f"{seconds:.1f} s")
    return "-- " + ", ".join(parts)


def kernel_counted_line(counted: int, by_reason) -> str:
    """The in-kernel counters' total for the same filters: exact even when events were lost."""
    text = f"-- the kernel counted {fmt_int(counted)} while conntrace was attached"
    if by_reason:
        text += ": " + ", ".join(f"{reason} {fmt_int(n)}" for reason, n in by_reason.most_common())
    return text


def trace_legend() -> str:
    return "\n".join(textwrap.wrap(
        "ST: conntrack TCP state (ES established, SS syn_sent, SR syn_recv, FW fin_wait, "
        "CW close_wait, LA last_ack, TW time_wait, CL close, S2 syn_sent2). SEQ/ACK/SACK: the "
        "number the reason is about. BOUND: the first value outside the window, as the kernel "
        "prints it. OFF-BY: bytes beyond it.", width=WIDTH))


# ---- top ------------------------------------------------------------------------------

def reasons_cell(reasons, n: int = 3) -> str:
    from .aggregate import VERDICT_MARK
    parts = []
    for (reason, verdict), count in reasons.most_common(n):
        mark = VERDICT_MARK.get(verdict, verdict)
        parts.append(f"{reason} {fmt_int(count)}" + (f" {mark}" if mark else ""))
    more = len(reasons) - n
    if more > 0:
        parts.append(f"+{more}")
    return ", ".join(parts)


def top_table(groups: list, by: str, now: float, owners: Optional[dict] = None,
              limit: int = 20, absolute: bool = False) -> str:
    """One table, sorted as given (by rate). owners: peer -> 'local endpoint (pid/comm)'."""
    owners = owners or {}
    headers_by = {"peer": "PEER", "pair": "PEER -> LOCAL", "port": "LOCAL PORT",
                  "netns": "NETNS", "reason": "REASON"}
    rows = []
    for g in groups[:limit]:
        label = elide(g.label, 44 if by == "pair" else 32)
        extra = ""
        if by == "peer":
            extra = owners.get(g.label) or _locals_cell(g)
        elif by in ("port", "reason", "netns"):
            extra = _peers_cell(g)
        elif by == "pair":
            extra = owners.get(g.key[0]) or ""
        rows.append([label, elide(extra, 24 if by != "pair" else 16), g.reasons,
                     fmt_rate(g.rate), fmt_int(g.packets),
                     fmt_time(g.last_seen) if absolute and g.last_seen else fmt_ago(g.last_seen, now)])
    second = {"peer": "LOCAL (PROCESS)", "pair": "PROCESS", "port": "PEERS", "netns": "PEERS",
              "reason": "PEERS"}[by]
    headers = [headers_by[by], second, "TOP REASONS", "INVALID/S", "TOTAL", "LAST SEEN"]
    # the reasons column gets whatever the others leave of WIDTH (2 spaces between columns)
    # (tabulate pads every header by 2, so a column is at least its header + 2 wide)
    others = sum(max([len(headers[i]) + 2] + [len(str(r[i])) for r in rows])
                 for i in (0, 1, 3, 4, 5))
    room = max(WIDTH - others - 2 * 5, 16)
    for r in rows:
        r[2] = elide(reasons_cell(r[2], 2 if by == "pair" else 3), room)
    table = tabulate(rows, headers=headers, tablefmt="plain",
                     colalign=("left", "left", "left", "right", "right", "right"),
                     disable_numparse=True)
    hidden = len(groups) - limit
    if hidden > 0:
        table += f"\n... {hidden} more group{'s' if hidden != 1 else ''} (use --json for all)"
    return table


def _locals_cell(g) -> str:
    if not g.locals:
        return ""
    first = sorted(g.locals)[0]
    return first + (f" +{len(g.locals) - 1}" if len(g.locals) > 1 else "")


def _peers_cell(g, width: int = 28) -> str:
    peers = sorted(g.peers, key=lambda p: (len(p), p))
    for n in (2, 1):
        text = ", ".join(peers[:n]) + (f" +{len(peers) - n}" if len(peers) > n else "")
        if len(text) <= width or n == 1:
            return text
    return ""


def top_header(when: float, rung: str, knobs: dict, invalid_delta: Optional[int], lost: int,
               overflow: int, interval: float, names: Optional[dict] = None,
               source: str = "") -> str:
    """Header lines: rung, per-netns knobs, conntrack's own invalid counter, losses."""
    names = names or {}
    lines = [f"{fmt_time(when)}  conntrace top  rung: {rung or '?'}"
             + (f"  {source}" if source else f"  interval {interval:g} s")]
    for netns, k in sorted(knobs.items()):
        label = names.get(netns) or str(netns)
        lines.append(f"  netns {label}: be_liberal={_knob(k, 'nf_conntrack_tcp_be_liberal')} "
                     f"loose={_knob(k, 'nf_conntrack_tcp_loose')} "
                     f"ignore_invalid_rst={_knob(k, 'nf_conntrack_tcp_ignore_invalid_rst')}")
    inv = "?" if invalid_delta is None else fmt_int(invalid_delta)
    lines.append(f"  conntrack invalid counter +{inv} (/proc/net/stat/nf_conntrack, all CPUs)  "
                 f"lost events: {fmt_int(lost)}  map overflow: {fmt_int(overflow)}")
    if overflow:
        lines.append("  !! the count map is full: the least recently seen groups were evicted, "
                     "so totals are lower bounds")
    return "\n".join(lines)


def _knob(k: dict, name: str) -> str:
    v = (k or {}).get(name)
    return "?" if v is None else str(v)


# ---- advice ---------------------------------------------------------------------------

_COMMAND_RE = re.compile(r"(sysctl|ip netns|nsenter|echo|ethtool|tcpdump|nft|iptables|conntrace) ")


def is_command(s: str) -> bool:
    return bool(_COMMAND_RE.match(s))


def _wrapped(label: str, text: str, width: int = WIDTH) -> list:
    """'    do:       text' wrapped with a hanging indent; commands stay on one line to copy."""
    first = f"    {label:<10} "
    if is_command(text) or len(first) + len(text) <= width:
        return [first + text]
    return textwrap.wrap(text, width=width, initial_indent=first,
                         subsequent_indent=" " * len(first), break_on_hyphens=False,
                         break_long_words=False)


def advice_text(advice: Iterable, verbose: bool = True) -> str:
    out = []
    for a in advice:
        out += textwrap.wrap(f"[{a.confidence}] {a.title}  (rule: {a.rule})", width=WIDTH,
                             subsequent_indent="    ", break_on_hyphens=False)
        evidence = a.evidence if verbose else a.evidence[:1]
        for e in evidence:
            out += _wrapped("evidence:", e)
        if verbose:
            for c in a.actions:
                out += _wrapped("do:", c)
            for p in a.persist:
                out += _wrapped("persist:", p)
            for t in a.tradeoffs:
                out += _wrapped("trade-off:", t)
        out.append("")
    return "\n".join(out).rstrip() + ("\n" if out else "")


def window_side_cell(side) -> str:
    flags = []
    if side.flags & TCP_FLAG_WINDOW_SCALE:
        flags.append("WSCALE")
    if side.flags & TCP_FLAG_BE_LIBERAL:
        flags.append("LIBERAL")
    if side.flags & TCP_FLAG_MAXACK_SET:
        flags.append("MAXACK")
    return (f"td_end={side.td_end} td_maxend={side.td_maxend} td_maxwin={side.td_maxwin} "
            f"td_maxack={side.td_maxack} td_scale={side.td_scale} flags=0x{side.flags:02x}"
            + (f" ({','.join(flags)})" if flags else ""))
