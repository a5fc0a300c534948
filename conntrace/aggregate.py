"""Counting: per (netns, peer, reason, verdict) rows, regrouped for `top` and the report.

Live `top` gets cumulative rows from the probe's in-kernel map; replay builds the same rows
from recorded events (plus the `omitted` records of a bounded file), so both paths share
the grouping, rate and sorting code below.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

GROUPINGS = ("peer", "pair", "port", "netns", "reason")

# Short verdict marks for reason lists ("SEQ_UNDER 12 ign"): invalid needs no mark.
VERDICT_MARK = {"invalid": "", "ignored": "ign", "accepted-liberal": "lib", "info": "info"}


@dataclass
class CountRow:
    """One counter: what the probe's map holds, optionally with the local endpoint."""
    netns: int
    peer: str
    reason: str
    verdict: str
    packets: int = 0
    bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    family: int = 4
    local: Optional[str] = None     # "addr:port" the segment was sent to, when known
    lport: Optional[int] = None     # that port

    def key(self):
        return (self.netns, self.peer, self.local, self.reason, self.verdict)


def from_probe_rows(rows: Iterable) -> list:
    """Normalise the probe's AggregateRow objects (they may lack local/port)."""
    out = []
    for r in rows:
        # decode.AggregateRow names them local/local_port; accept daddr/dport as well
        lport = getattr(r, "local_port", getattr(r, "dport", None))
        laddr = getattr(r, "local", getattr(r, "daddr", None))
        out.append(CountRow(netns=r.netns, peer=r.peer, reason=r.reason, verdict=r.verdict,
                            packets=r.packets, bytes=r.bytes, first_seen=r.first_seen,
                            last_seen=r.last_seen, family=getattr(r, "family", 4),
                            local=f"{fmt_endpoint(laddr, lport)}" if laddr else None, lport=lport))
    return out


def fmt_endpoint(addr: str, port) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def rows_from_events(events: Iterable, omitted: Iterable[dict] = ()) -> list:
    """Count recorded events the way the in-kernel map would, keeping the local endpoint."""
    rows: dict = {}
    for ev in events:
        local = fmt_endpoint(ev.daddr, ev.dport)
        k = (ev.netns, ev.saddr, local, ev.reason, ev.verdict)
        row = rows.get(k)
        if row is None:
            row = rows[k] = CountRow(netns=ev.netns, peer=ev.saddr, reason=ev.reason,
                                     verdict=ev.verdict, first_seen=ev.time, last_seen=ev.time,
                                     family=ev.family, local=local, lport=ev.dport)
        row.packets += 1
        row.bytes += ev.payload
        row.first_seen = min(row.first_seen, ev.time)
        row.last_seen = max(row.last_seen, ev.time)
    for om in omitted:
        # omitted records carry no local endpoint: they add to the peer's count only
        k = (om["netns"], om["peer"], None, om["reason"], om["verdict"])
        row = rows.get(k)
        if row is None:
            row = rows[k] = CountRow(netns=om["netns"], peer=om["peer"], reason=om["reason"],
                                     verdict=om["verdict"], family=6 if ":" in om["peer"] else 4,
                                     first_seen=om.get("first_seen", 0.0) or 0.0,
                                     last_seen=om.get("last_seen", 0.0) or 0.0)
        row.packets += om["count"]
        row.bytes += om.get("bytes", 0) or 0
    return list(rows.values())


@dataclass
class Group:
    key: tuple
    label: str
    packets: int = 0
    invalid: int = 0
    bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    reasons: Counter = field(default_factory=Counter)    # (reason, verdict) -> packets
    peers: set = field(default_factory=set)
    locals: set = field(default_factory=set)
    netns: set = field(default_factory=set)
    rate: float = 0.0            # invalid packets per second over the last interval
    total_rate: float = 0.0      # all verdicts per second

    def top_reasons(self, n: int = 3) -> list:
        return self.reasons.most_common(n)


def _group_key(row: CountRow, by: str):
    if by == "peer":
        return (row.peer,), row.peer
    if by == "pair":
        local = row.local or "?"
        return (row.peer, local), f"{row.peer} -> {local}"
    if by == "port":
        port = row.lport if row.lport is not None else "?"
        return (port,), str(port)
    if by == "netns":
        return (row.netns,), str(row.netns)
    if by == "reason":
        return (row.reason,), row.reason
    raise ValueError(f"unknown grouping {by!r}; use one of {', '.join(GROUPINGS)}")


def group_rows(rows: Iterable[CountRow], by: str = "peer") -> dict:
    groups: dict = {}
    for row in rows:
        key, label = _group_key(row, by)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(key=key, label=label, first_seen=row.first_seen,
                                    last_seen=row.last_seen)
        g.packets += row.packets
        if row.verdict == "invalid":
            g.invalid += row.packets
        g.bytes += row.bytes
        if row.first_seen:
            g.first_seen = min(g.first_seen, row.first_seen) if g.first_seen else row.first_seen
        g.last_seen = max(g.last_seen, row.last_seen)
        g.reasons[(row.reason, row.verdict)] += row.packets
        g.peers.add(row.peer)
        if row.local:
            g.locals.add(row.local)
        g.netns.add(row.netns)
    return groups


def with_rates(current: dict, previous: Optional[dict], seconds: float) -> list:
    """Attach per-second rates: delta since the previous snapshot, or total/seconds."""
    seconds = max(seconds, 1e-9)
    for key, g in current.items():
        prev = previous.get(key) if previous else None
        d_inv = g.invalid - (prev.invalid if prev else 0)
        d_all = g.packets - (prev.packets if prev else 0)
        # an LRU eviction can make a counter go backwards; never show negative rates
        g.rate = max(d_inv, 0) / seconds
        g.total_rate = max(d_all, 0) / seconds
    return sort_groups(current.values())


def sort_groups(groups: Iterable[Group]) -> list:
    return sorted(groups, key=lambda g: (-g.rate, -g.total_rate, -g.invalid, -g.packets, g.label))


def recording_span(rows: Iterable[CountRow], events: Iterable = ()) -> float:
    """Seconds covered by a recording (at least 1) so replay can show average rates."""
    times = [t for r in rows for t in (r.first_seen, r.last_seen) if t]
    times += [e.time for e in events]
    if len(times) < 2:
        return 1.0
    return max(max(times) - min(times), 1.0)


def totals_by_verdict(rows: Iterable[CountRow]) -> Counter:
    c: Counter = Counter()
    for r in rows:
        c[r.verdict] += r.packets
    return c


def totals_by_reason(rows: Iterable[CountRow], verdict: Optional[str] = None) -> Counter:
    c: Counter = Counter()
    for r in rows:
        if verdict is None or r.verdict == verdict:
            c[r.reason] += r.packets
    return c


def peer_reason_table(rows: Iterable[CountRow]) -> list:
    """(netns, peer, reason, verdict, packets, first, last) sorted by packets: the report's table."""
    merged: dict = {}
    for r in rows:
        k = (r.netns, r.peer, r.reason, r.verdict)
        m = merged.setdefault(k, [0, 0, r.first_seen, r.last_seen])
        m[0] += r.packets
        m[1] += r.bytes
        if r.first_seen:
            m[2] = min(m[2], r.first_seen) if m[2] else r.first_seen
        m[3] = max(m[3], r.last_seen)
    out = [(k[0], k[1], k[2], k[3], v[0], v[1], v[2], v[3]) for k, v in merged.items()]
    out.sort(key=lambda t: (-t[4], t[1], t[2]))
    return out
