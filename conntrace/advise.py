"""Advice: pure rules from what was seen to what to change, each with its evidence.

Input is an AdviceInput (events, exact counter rows, per-netns sysctls, kernel release);
every rule is a function AdviceInput -> list[Advice] with no I/O, so each one is tested
from recorded events.  Commands are exact and name the namespace where the events happened.
"""
from __future__ import annotations

import re
import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .aggregate import CountRow, rows_from_events
from .events import WINDOW_REASONS, TCP_FLAG_WINDOW_SCALE, U32
from .render import endpoint, explain, fmt_int

BE_LIBERAL = "nf_conntrack_tcp_be_liberal"
IGNORE_RST = "nf_conntrack_tcp_ignore_invalid_rst"
CHECKSUM = "nf_conntrack_checksum"

# rule name -> (knob, value) that `conntrace advise --apply RULE` writes
APPLY = {
    "be-liberal": (BE_LIBERAL, 1),
    "ignore-invalid-rst": (IGNORE_RST, 1),
    "checksum-test": (CHECKSUM, 0),
}

CONFIDENCE = ("high", "medium", "low")


@dataclass
class Advice:
    rule: str
    title: str
    confidence: str
    netns: Optional[int] = None
    evidence: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    persist: list = field(default_factory=list)
    tradeoffs: list = field(default_factory=list)
    apply: Optional[str] = None          # the --apply RULE name that implements it, if any

    def to_dict(self) -> dict:
        return {"rule": self.rule, "title": self.title, "confidence": self.confidence,
                "netns": self.netns, "evidence": self.evidence, "actions": self.actions,
                "persist": self.persist, "tradeoffs": self.tradeoffs, "apply": self.apply}


@dataclass
class AdviceInput:
    events: list = field(default_factory=list)
    rows: Optional[list] = None          # exact counts; derived from events when None
    sysctls: dict = field(default_factory=dict)       # netns inode -> {knob: int|None}
    netns_names: dict = field(default_factory=dict)   # inode -> {"names": [...], "pids": [...]}
    own_netns: Optional[int] = None      # the namespace conntrace ran in (host)
    kernel: Optional[str] = None         # uname -r of the traced host

    def __post_init__(self):
        if self.rows is None:
            self.rows = rows_from_events(self.events)
        # JSON object keys are strings: accept both
        self.sysctls = {int(k): v for k, v in (self.sysctls or {}).items()}
        self.netns_names = {int(k): v for k, v in (self.netns_names or {}).items()}

    # -- helpers the rules share --
    def knob(self, netns: int, name: str) -> Optional[int]:
        return (self.sysctls.get(netns) or {}).get(name)

    def counts(self, pred) -> Counter:
        """(netns, peer, reason, verdict) -> packets over rows matching pred(row)."""
        c: Counter = Counter()
        for r in self.rows:
            if pred(r):
                c[(r.netns, r.peer, r.reason, r.verdict)] += r.packets
        return c

    def in_netns(self, netns: Optional[int], cmd: str) -> str:
        """Prefix cmd so it runs in netns: nothing for the host, ip netns exec, or nsenter."""
        if netns is None or netns == self.own_netns:
            return cmd
        entry = self.netns_names.get(netns) or {}
        if entry.get("names"):
            return f"ip netns exec {shlex.quote(entry['names'][0])} {cmd}"
        if entry.get("pids"):
            return f"nsenter --net=/proc/{entry['pids'][0]}/ns/net {cmd}"
        return f"nsenter --net=/proc/<PID in netns {netns}>/ns/net {cmd}"

    def netns_label(self, netns: Optional[int]) -> str:
        if netns is None:
            return "?"
        if netns == self.own_netns:
            return f"host netns {netns}"
        entry = self.netns_names.get(netns) or {}
        if entry.get("names"):
            return f"netns {entry['names'][0]} ({netns})"
        if entry.get("pids"):
            return f"netns {netns} (pid {entry['pids'][0]})"
        return f"netns {netns}"

    def apply_target(self, netns: Optional[int]) -> str:
        """What to pass to --netns for this namespace."""
        entry = self.netns_names.get(netns) or {}
        if netns == self.own_netns:
            return "1"
        if entry.get("names"):
            return entry["names"][0]
        if entry.get("pids"):
            return str(entry["pids"][0])
        return "<NAME|PID|PATH>"

    def samples(self, pred, n: int = 1) -> list:
        return [e for e in self.events if pred(e)][:n]


def _flow(e) -> str:
    return f"{endpoint(e.saddr, e.sport)} -> {endpoint(e.daddr, e.dport)}"


def kernel_version(release: Optional[str]):
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _peers_text(c: Counter, n: int = 3) -> str:
    per_peer: Counter = Counter()
    for (netns, peer, reason, verdict), k in c.items():
        per_peer[peer] += k
    parts = [f"{p} ({fmt_int(k)})" for p, k in per_peer.most_common(n)]
    more = len(per_peer) - n
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _reasons_text(c: Counter) -> str:
    per: Counter = Counter()
    for (netns, peer, reason, verdict), k in c.items():
        per[(reason, verdict)] += k
    return ", ".join(f"{r} {fmt_int(k)}" + ("" if v == "invalid" else f" ({v})")
                     for (r, v), k in per.most_common())


def _by_netns(c: Counter) -> dict:
    out: dict = defaultdict(Counter)
    for key, k in c.items():
        out[key[0]][key] += k
    return out


def _persist_lines(inp: AdviceInput, netns: int, knob: str, value: int) -> list:
    line = f"net.netfilter.{knob} = {value}"
    if netns == inp.own_netns or netns is None:
        return [f"echo '{line}' >> /etc/sysctl.d/90-conntrace.conf",
                "echo nf_conntrack > /etc/modules-load.d/nf_conntrack.conf",
                "the second line matters: the sysctl exists only once nf_conntrack is loaded, and "
                "without it systemd-sysctl may run before the module and skip the setting"]
    return [f"/etc/sysctl.d applies to the host namespace only: add "
            f"`{inp.in_netns(netns, 'sysctl -w net.netfilter.' + knob + '=' + str(value))}` "
            "to whatever creates this namespace (CNI, container runtime hook, systemd unit)"]


# ---- rules ----------------------------------------------------------------------------

def rule_be_liberal(inp: AdviceInput) -> list:
    """Window reasons marked INVALID while be_liberal is off -> enable it in that netns."""
    out = []
    window = inp.counts(lambda r: r.reason in WINDOW_REASONS and r.verdict == "invalid")
    for netns, c in _by_netns(window).items():
        liberal = inp.knob(netns, BE_LIBERAL)
        if liberal == 1:
            continue      # rule_liberal_remaining explains this case
        total = sum(c.values())
        ev = [f"{fmt_int(total)} segments INVALID for window reasons in "
              f"{inp.netns_label(netns)}: {_reasons_text(c)}",
              f"from {_peers_text(c)}",
              f"nf_conntrack_tcp_be_liberal = {'?' if liberal is None else liberal} there"]
        for s in inp.samples(lambda e: e.netns == netns and e.reason in WINDOW_REASONS
                             and e.verdict == "invalid"):
            ev.append(f"e.g. {_flow(s)}: {explain(s)}")
        confidence = "high" if liberal == 0 and total >= 10 else "medium"
        out.append(Advice(
            rule="be-liberal", netns=netns, confidence=confidence, apply="be-liberal",
            title=f"Enable nf_conntrack_tcp_be_liberal in {inp.netns_label(netns)}",
            evidence=ev,
            actions=[inp.in_netns(netns, f"sysctl -w net.netfilter.{BE_LIBERAL}=1"),
                     f"or: conntrace advise --apply be-liberal --netns {inp.apply_target(netns)}",
                     "Kubernetes: run kube-proxy with --conntrack-tcp-be-liberal "
                     "(KubeProxyConfiguration conntrack.tcpBeLiberal: true)",
                     "verify: the INVALID counter stops growing (`conntrace top`); on 6.1-6.12 "
                     "kernels `conntrace trace` then shows these segments as accepted-liberal"],
            persist=_persist_lines(inp, netns, BE_LIBERAL, 1),
            tradeoffs=["conntrack stops checking TCP windows in this namespace: out-of-window "
                       "data and ACKs are tracked (and NATed) instead of marked INVALID, so a "
                       "`ct state invalid drop` rule no longer catches them",
                       "window state is not advanced by these segments; out-of-window RSTs are "
                       "still INVALID",
                       "it hides the cause: if a middlebox is to blame (see other advice), "
                       "fixing it is better"]))
    return out


def _ack_in_range(e) -> Optional[bool]:
    """For SACK_OVER: is the plain ACK number within bound (the SACK edge is what failed)?"""
    if e.bound is None:
        return None
    return ((e.bound - e.ack) % U32) < 2 ** 31 and e.ack != e.bound


def _constant_offset(events) -> Optional[str]:
    """SACK edge minus ACK stays (nearly) the same per connection: a fixed ISN offset."""
    per_flow: dict = defaultdict(list)
    for e in events:
        if e.sack is not None:
            per_flow[(e.saddr, e.sport, e.daddr, e.dport)].append((e.sack - e.ack) % U32)
    for flow, diffs in per_flow.items():
        if len(diffs) >= 3 and max(diffs) - min(diffs) <= 256 * 1024:
            mid = sorted(diffs)[len(diffs) // 2]
            return (f"SACK edge minus ACK stays near {fmt_int(mid)} on all {len(diffs)} segments "
                    f"of {endpoint(flow[0], flow[1])} -> {endpoint(flow[2], flow[3])}: a constant sequence offset, "
                    "the signature of sequence number randomization")
    return None


def rule_seq_randomization(inp: AdviceInput) -> list:
    """SACK edge beyond the window while ACK is in range -> a sequence-rewriting middlebox."""
    c = inp.counts(lambda r: r.reason == "SACK_OVER")
    if not c:
        return []
    out = []
    for netns, cn in _by_netns(c).items():
        total = sum(cn.values())
        samples = inp.samples(lambda e: e.netns == netns and e.reason == "SACK_OVER", 3)
        ev = [f"{fmt_int(total)} segments whose SACK block lies beyond the data sent while the "
              f"ACK number is in range, from {_peers_text(cn)}"]
        for s in samples[:1]:
            ev.append(f"e.g. {_flow(s)}: {explain(s)}")
        offset = _constant_offset([e for e in inp.events
                                   if e.netns == netns and e.reason == "SACK_OVER"])
        if offset:
            ev.append(offset)
        confirmed = [s for s in samples if _ack_in_range(s)]
        confidence = "high" if total >= 3 and (confirmed or not samples) else "medium"
        out.append(Advice(
            rule="seq-randomization", netns=netns, confidence=confidence, apply="be-liberal",
            title="A middlebox rewrites TCP sequence numbers without translating SACK blocks "
                  "(e.g. Cisco ASA/FTD TCP sequence number randomization)",
            evidence=ev,
            actions=["on a Cisco ASA: disable randomization for this traffic, e.g. "
                     "`policy-map global_policy` / `class <traffic>` / "
                     "`set connection random-sequence-number disable`; on FTD use the "
                     "'Disable TCP Sequence Randomization' FlexConfig",
                     "confirm: tcpdump on both sides of the middlebox shows different ISNs for "
                     "the same connection, and SACK blocks left untranslated",
                     "or tolerate it here: " + inp.in_netns(
                         netns, f"sysctl -w net.netfilter.{BE_LIBERAL}=1")],
            tradeoffs=["disabling randomization on the firewall gives up its ISN hardening for "
                       "that traffic class; be_liberal gives up window checking here",
                       "SACK itself is also broken end-to-end by such a middlebox: expect "
                       "stalls and retransmissions even without conntrack"]))
    return out


def _wscale_asymmetric(e) -> bool:
    a, b = e.seen
    fa, fb = bool(a.flags & TCP_FLAG_WINDOW_SCALE), bool(b.flags & TCP_FLAG_WINDOW_SCALE)
    if fa != fb:
        return True
    # both flagged but one scale was zeroed: what tcp_init_sender does when one SYN lacked it
    return fa and fb and (a.td_scale == 0) != (b.td_scale == 0)


def rule_window_scale(inp: AdviceInput) -> list:
    """Window scaling seen on one side only, on flows failing window checks -> middlebox."""
    hits = [e for e in inp.events if e.reason in WINDOW_REASONS and _wscale_asymmetric(e)]
    if not hits:
        return []
    out = []
    by_ns: dict = defaultdict(list)
    for e in hits:
        by_ns[e.netns].append(e)
    for netns, evs in by_ns.items():
        s = evs[0]
        peers = Counter(e.saddr for e in evs)
        a, b = s.seen
        ev = [f"{fmt_int(len(evs))} window-check failures on flows where only one direction "
              f"announced window scaling, from "
              + ", ".join(f"{p} ({fmt_int(k)})" for p, k in peers.most_common(3)),
              f"e.g. {_flow(s)}: original side "
              f"{'WSCALE' if a.flags & TCP_FLAG_WINDOW_SCALE else 'no WSCALE'} td_scale "
              f"{a.td_scale}, reply side {'WSCALE' if b.flags & TCP_FLAG_WINDOW_SCALE else 'no WSCALE'}"
              f" td_scale {b.td_scale}; conntrack then tracks both windows unscaled"]
        out.append(Advice(
            rule="window-scale", netns=netns, confidence="medium" if len(evs) >= 3 else "low",
            apply="be-liberal",
            title="A middlebox altered window scaling between the two directions",
            evidence=ev,
            actions=[f"capture the handshake on both sides: tcpdump -ni any "
                     f"'tcp[tcpflags] & tcp-syn != 0 and host {s.saddr}' and compare the wscale "
                     "options the endpoints sent with the ones that arrived",
                     "fix the device that strips or rewrites the option (firewall 'TCP "
                     "normalization', load balancer, WAN optimizer)",
                     "or tolerate it here: " + inp.in_netns(
                         netns, f"sysctl -w net.netfilter.{BE_LIBERAL}=1")],
            tradeoffs=["endpoints may disagree about the window too, which costs throughput "
                       "even when conntrack is liberal"]))
    return out


def rule_invalid_rst(inp: AdviceInput) -> list:
    """RST behind the peer's highest ACK -> ignore_invalid_rst (be_liberal does not cover RST)."""
    c = inp.counts(lambda r: r.reason == "INVALID_RST" and r.verdict == "invalid")
    out = []
    ver = kernel_version(inp.kernel)
    for netns, cn in _by_netns(c).items():
        total = sum(cn.values())
        knob = inp.knob(netns, IGNORE_RST)
        ev = [f"{fmt_int(total)} RST segments INVALID in {inp.netns_label(netns)} from "
              f"{_peers_text(cn)}",
              f"nf_conntrack_tcp_ignore_invalid_rst = {'?' if knob is None else knob} there"]
        for s in inp.samples(lambda e: e.netns == netns and e.reason == "INVALID_RST"):
            ev.append(f"e.g. {_flow(s)}: {explain(s)}")
        actions = [inp.in_netns(netns, f"sysctl -w net.netfilter.{IGNORE_RST}=1"),
                   f"or: conntrace advise --apply ignore-invalid-rst --netns "
                   f"{inp.apply_target(netns)}",
                   "do NOT expect nf_conntrack_tcp_be_liberal to help: it does not cover RST "
                   "segments"]
        if ver and ver < (5, 14):
            actions.insert(0, f"this kernel ({inp.kernel}) predates the knob (added in 5.14): "
                              "upgrade, or exempt the flow with notrack")
        out.append(Advice(
            rule="ignore-invalid-rst", netns=netns, apply="ignore-invalid-rst",
            confidence="high" if total >= 3 else "medium",
            title=f"Stop marking out-of-window RSTs INVALID in {inp.netns_label(netns)}",
            evidence=ev, actions=actions,
            persist=_persist_lines(inp, netns, IGNORE_RST, 1),
            tradeoffs=["an RST with an old sequence number then tears down the conntrack entry; "
                       "the endpoint's TCP still validates RSTs itself (RFC 5961)"]))
    return out


def rule_bad_checksum(inp: AdviceInput) -> list:
    c = inp.counts(lambda r: r.reason == "BAD_CHECKSUM")
    out = []
    for netns, cn in _by_netns(c).items():
        total = sum(cn.values())
        out.append(Advice(
            rule="bad-checksum", netns=netns, confidence="high", apply="checksum-test",
            title="TCP checksums are wrong when conntrack sees them: offload or mangling problem",
            evidence=[f"{fmt_int(total)} segments with a bad TCP checksum at PRE_ROUTING in "
                      f"{inp.netns_label(netns)} from {_peers_text(cn)}"],
            actions=["check offloads on the receiving interface: ethtool -k IFACE | grep -i "
                     "checksum; test with: ethtool -K IFACE rx off tx off",
                     "on veth/virtio/tunnels, a sender with tx checksum offload may hand over "
                     "CHECKSUM_PARTIAL packets; capture with `tcpdump -vvni IFACE host PEER` on "
                     "the receiving side",
                     "to test whether only conntrack's check is the problem: " + inp.in_netns(
                         netns, f"sysctl -w net.netfilter.{CHECKSUM}=0")
                     + " (then restore 1)"],
            tradeoffs=["nf_conntrack_checksum=0 lets corrupted segments update conntrack state; "
                       "use it as a test, fix the offload or the mangling device instead"]))
    return out


def rule_asymmetric_routing(inp: AdviceInput) -> list:
    """INVALID_STATE, or conntrack seeing one direction only -> asymmetric routing."""
    c = inp.counts(lambda r: r.reason == "INVALID_STATE" and r.verdict == "invalid")
    one_sided = [e for e in inp.events
                 if e.verdict == "invalid" and (e.seen[0].td_maxwin == 0) != (e.seen[1].td_maxwin == 0)
                 and e.ct_state not in ("NONE", "SYN_SENT")]
    syn_sent_reply = [e for e in inp.events if e.reason == "IGNORED_STATE"
                      and e.ct_state == "SYN_SENT" and e.dir == "reply" and "S" not in e.flags]
    netnses = set(_by_netns(c)) | {e.netns for e in one_sided + syn_sent_reply}
    out = []
    for netns in netnses:
        cn = _by_netns(c).get(netns, Counter())
        ev = []
        if cn:
            ev.append(f"{fmt_int(sum(cn.values()))} segments not allowed in their TCP state from "
                      f"{_peers_text(cn)}")
            for s in inp.samples(lambda e: e.netns == netns and e.reason == "INVALID_STATE"):
                ev.append(f"e.g. {_flow(s)}: {explain(s)} "
                          f"kernel: {s.message!r}")
        ns_one = [e for e in one_sided if e.netns == netns]
        if ns_one:
            ev.append(f"{fmt_int(len(ns_one))} INVALID segments on connections where conntrack "
                      "never saw one direction's window (td_maxwin 0)")
        ns_syn = [e for e in syn_sent_reply if e.netns == netns]
        if ns_syn:
            ev.append(f"{fmt_int(len(ns_syn))} reply segments without SYN on entries still in "
                      "SYN_SENT: the SYN/ACK went another way")
        peer = (next(iter(cn))[1] if cn else (ns_one or ns_syn)[0].saddr)
        total = sum(cn.values()) + len(ns_one) + len(ns_syn)
        out.append(Advice(
            rule="asymmetric-routing", netns=netns,
            confidence="medium" if total >= 3 else "low",
            title="Conntrack sees only part of these connections: asymmetric routing",
            evidence=ev,
            actions=[f"check that both directions pass this host: ip route get {peer}; "
                     "sysctl net.ipv4.conf.all.rp_filter; anycast, ECMP or LVS-DR return paths",
                     "if the path is meant to be asymmetric, exempt it from tracking: "
                     + inp.in_netns(netns, f"nft add rule inet raw prerouting ip saddr {peer} "
                                           "notrack")
                     + " (needs a raw table/chain at priority -300), or "
                     + inp.in_netns(netns, f"iptables -t raw -A PREROUTING -s {peer} -p tcp "
                                           "-j CT --notrack")],
            tradeoffs=["untracked traffic gets no NAT and matches no ct state rules: accept "
                       "it explicitly in both directions"]))
    return out


def rule_only_ignored(inp: AdviceInput) -> list:
    verdicts = Counter()
    for r in inp.rows:
        verdicts[r.verdict] += r.packets
    if not verdicts or verdicts.get("invalid") or verdicts.get("accepted-liberal"):
        return []
    c = inp.counts(lambda r: True)
    return [Advice(
        rule="only-ignored", confidence="high",
        title="Nothing was marked INVALID: no action needed",
        evidence=[f"{fmt_int(sum(verdicts.values()))} segments, all ignored or informational: "
                  f"{_reasons_text(c)}",
                  "IGNOREd segments pass with their conntrack entry; only the entry's state "
                  "and timeout are left unchanged"],
        actions=["none; keep watching with `conntrace top` if connections still stall"])]


def rule_pre61_under(inp: AdviceInput) -> list:
    """SEQ_UNDER/ACK_UNDER marked INVALID: a pre-6.1 kernel; 6.1+ ignores these."""
    c = inp.counts(lambda r: r.reason in ("SEQ_UNDER", "ACK_UNDER") and r.verdict == "invalid")
    if not c:
        return []
    ver = kernel_version(inp.kernel)
    total = sum(c.values())
    return [Advice(
        rule="pre-6.1-under", confidence="high" if (ver and ver < (6, 1)) else "medium",
        title="This kernel marks late retransmissions and delayed ACKs INVALID; 6.1+ ignores them",
        evidence=[f"{fmt_int(total)} segments INVALID for under-the-lower-bound reasons: "
                  f"{_reasons_text(c)}, from {_peers_text(c)}",
                  f"kernel {inp.kernel or '(unknown)'}; since Linux 6.1 (\"netfilter: conntrack: "
                  "ignore overly delayed tcp packets\") these are IGNOREd and pass"],
        actions=["upgrade to a 6.1 or newer kernel",
                 "until then, nf_conntrack_tcp_be_liberal=1 (see its advice) stops these "
                 "INVALIDs"])]


def rule_liberal_remaining(inp: AdviceInput) -> list:
    """be_liberal on and INVALIDs remain -> those reasons are not window reasons."""
    out = []
    c = inp.counts(lambda r: r.verdict == "invalid")
    for netns, cn in _by_netns(c).items():
        if inp.knob(netns, BE_LIBERAL) != 1:
            continue
        reasons = Counter()
        for (_, _, reason, _), k in cn.items():
            reasons[reason] += k
        window_left = [r for r in reasons if r in WINDOW_REASONS]
        ev = [f"nf_conntrack_tcp_be_liberal = 1 in {inp.netns_label(netns)}, yet "
              f"{fmt_int(sum(cn.values()))} segments are INVALID: "
              + ", ".join(f"{r} {fmt_int(k)}" for r, k in reasons.most_common())]
        if window_left:
            ev.append("window reasons remain, which liberal mode should accept: the snapshot "
                      "of the sysctl may be from another namespace than the events")
        out.append(Advice(
            rule="liberal-remaining", netns=netns, confidence="high",
            title="be_liberal is already on; the remaining INVALIDs are not window reasons",
            evidence=ev,
            actions=["see the advice for each remaining reason (invalid RST, state, checksum, "
                     "flags); turning more knobs on will not change window checking"]))
    return out


def rule_liberal_accepting(inp: AdviceInput) -> list:
    c = inp.counts(lambda r: r.verdict == "accepted-liberal")
    out = []
    for netns, cn in _by_netns(c).items():
        total = sum(cn.values())
        out.append(Advice(
            rule="liberal-accepting", netns=netns, confidence="high",
            title=f"be_liberal is accepting {fmt_int(total)} segments that would be INVALID",
            evidence=[f"in {inp.netns_label(netns)}: {_reasons_text(cn)}, from {_peers_text(cn)}",
                      "turning nf_conntrack_tcp_be_liberal off would make these INVALID (and "
                      "dropped by any `ct state invalid drop` rule)"],
            actions=["none while liberal mode is wanted; to fix the senders instead, see the "
                     "reasons above"]))
    return out


def rule_invalid_new(inp: AdviceInput) -> list:
    c = inp.counts(lambda r: r.reason == "INVALID_NEW" and r.verdict == "invalid")
    out = []
    for netns, cn in _by_netns(c).items():
        k = inp.sysctls.get(netns) or {}
        ev = [f"{fmt_int(sum(cn.values()))} mid-connection segments with no conntrack entry, "
              f"from {_peers_text(cn)}"]
        if k.get("nf_conntrack_count") is not None and k.get("nf_conntrack_max"):
            ev.append(f"table: {fmt_int(k['nf_conntrack_count'])} of "
                      f"{fmt_int(k['nf_conntrack_max'])} entries")
        out.append(Advice(
            rule="entry-expired", netns=netns, confidence="medium",
            title="Connections outlive their conntrack entries (expired, evicted or flushed)",
            evidence=ev,
            actions=["compare idle times with net.netfilter.nf_conntrack_tcp_timeout_established "
                     "and look for `conntrack -F` or table-full evictions (early_drop in "
                     "/proc/net/stat/nf_conntrack)",
                     "keepalives shorter than the timeout keep entries alive"]))
    return out


def rule_bad_flags(inp: AdviceInput) -> list:
    c = inp.counts(lambda r: r.reason == "BAD_FLAGS")
    if not c:
        return []
    return [Advice(
        rule="bad-flags", confidence="high",
        title="Invalid TCP flag combinations: scans or broken senders, not a conntrack problem",
        evidence=[f"{fmt_int(sum(c.values()))} segments from {_peers_text(c)}"],
        actions=["none in conntrack; keep the INVALID drop rule, it is doing its job here"])]


RULES = (rule_seq_randomization, rule_window_scale, rule_be_liberal, rule_invalid_rst,
         rule_bad_checksum, rule_asymmetric_routing, rule_pre61_under, rule_liberal_remaining,
         rule_liberal_accepting, rule_invalid_new, rule_bad_flags, rule_only_ignored)


def advise(inp: AdviceInput) -> list:
    out = []
    for rule in RULES:
        out.extend(rule(inp))
    return out


def rows_plus_events(rows: Optional[list], events: list) -> list:
    """Exact rows when the probe gave them, else counts from the events we have."""
    return rows if rows else rows_from_events(events)


__all__ = ["Advice", "AdviceInput", "advise", "APPLY", "RULES", "CountRow"]
