"""Reproduce every conntrack TCP INVALID reason on the running kernel and record the oracle.

Why this exists: conntrace claims to explain why conntrack rejected a segment. The only
trustworthy reference is the kernel itself, so this module makes a real TCP connection
between two network namespaces (client -> server, the server netns has a stateful nft
firewall), learns its live sequence numbers by sniffing the veth, then injects one hand-built
segment per scenario from outside the server (so conntrack sees it at PRE_ROUTING) and records
what the kernel says: its own `nf_ct_proto_6:` log line, the conntrack invalid/ignore
counters, and whether the `ct state invalid` rule dropped the segment. Each scenario runs
on a fresh connection with its own ports, with `nf_conntrack_tcp_be_liberal` 0 and 1, over
IPv4 and (window reasons) IPv6.

The expectations (EXPECTED) come from the kernel behaviour in
shared/reference/conntrack-tcp-invalid.md; the lab tests compare them with the oracle, so a
kernel that behaves differently shows up as a failing test.

    python3 -m tests.lab.scenarios run [--only NAME ...] [--ipv6-too] [--liberal 0|1|both]
                                       [--wait-for FILE] [--settle S] [--check] --out FILE.json
    python3 -m tests.lab.scenarios list

Run it as root from the checkout root. A tracer can be started first: with --wait-for FILE
the namespaces are set up, then the run waits until FILE exists before the first scenario;
every scenario carries wall-clock start/inject/end times (time.time()) to match its events.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from . import netlab
from .packets import (ACK, FIN, PSH, RST, SYN, PACKET_OUTGOING, PacketSocket, Segment, opt_mss,
                      opt_nop, opt_sack, opt_sack_perm, opt_timestamps, opt_wscale, parse_frame,
                      seq_after)

M32 = 0xFFFFFFFF
MAXACKWINCONST = 66000

# Topology constants (inside throw-away namespaces, so fixed values are fine)
CLIENT_MAC, SERVER_MAC = "02:c7:00:00:00:01", "02:c7:00:00:00:02"
ADDRS = {"ipv4": ("10.213.0.1", "10.213.0.2", 24), "ipv6": ("fd00:c7::1", "fd00:c7::2", 64)}
SERVER_PORT_BASE, CLIENT_PORT_BASE = 20000, 40000
REQUEST, RESPONSE = b"q" * 100, b"r" * 200

WINDOW_SCENARIOS = ("seq_over", "ack_over", "sack_over", "seq_under", "ack_under", "overshot")
OTHER_SCENARIOS = ("invalid_rst", "invalid_state", "ignored_state", "bad_flags", "bad_checksum",
                   "truncated")
ALL_SCENARIOS = WINDOW_SCENARIOS + OTHER_SCENARIOS

DESCRIPTIONS = {
    "seq_over": "data segment starting 2^30 beyond the client's next sequence number",
    "ack_over": "wild ACK: acknowledges 2^30 bytes the server never sent",
    "sack_over": "ACK number fine, but a SACK block whose right edge is 2^30 beyond the server's data",
    "seq_under": "data segment 2^29 bytes behind the client's next sequence number",
    "ack_under": "ACK 2^29 bytes behind what the client already acknowledged",
    "overshot": "data starting just beyond the server's advertised window (within one window)",
    "invalid_rst": "RST whose sequence number is behind the server's highest ACK",
    "invalid_state": "SYN/ACK from the client (original direction) in ESTABLISHED",
    "ignored_state": "SYN from the client in ESTABLISHED (a reopen attempt)",
    "bad_flags": "SYN+FIN",
    "bad_checksum": "in-window data segment with a wrong TCP checksum",
    "truncated": "data offset says 60 bytes of header, only 20 are present",
}

# ---------------------------------------------------------------------------------------------
# Expectations, by kernel era. "pre-6.1" describes 5.10 (the lab's only pre-6.1 kernel):
# 5.12-5.18 already print "packet (index ...) ... ignored", 5.19 "... invalid", and 5.19.9/6.0
# "bytes more than expected" -- see reference §1.5 and §2.3.
#   name: (reason label conntrace should show, reason code the kernel message maps to,
#          message regex, verdict)
EXPECTED = {
    "6.1+": {
        "seq_over": ("SEQ_OVER", "SEQ_OVER", r"^SEQ is over upper bound \d+ \(over the window of the receiver\)$", "invalid"),
        "ack_over": ("ACK_OVER", "ACK_OVER", r"^ACK is over upper bound \d+ \(ACKed data not seen yet\)$", "invalid"),
        "sack_over": ("SACK_OVER", "ACK_OVER", r"^ACK is over upper bound \d+ \(ACKed data not seen yet\)$", "invalid"),
        "seq_under": ("SEQ_UNDER", "SEQ_UNDER", r"^SEQ is under lower bound \d+ \(already ACKed data retransmitted\)$", "ignored"),
        "ack_under": ("ACK_UNDER", "ACK_UNDER", r"^ignored ACK under lower bound \d+ \(possible overly delayed\)$", "ignored"),
        "overshot": ("OVERSHOT", "OVERSHOT", r"^\d+ bytes more than expected$", "ignored"),
        "invalid_rst": ("INVALID_RST", "INVALID_RST", r"^invalid rst$", "invalid"),
        "invalid_state": ("INVALID_STATE", "INVALID_STATE", r"^packet \(index 1\) in dir 0 invalid, state ESTABLISHED$", "invalid"),
        "ignored_state": ("IGNORED_STATE", "IGNORED_STATE", r"^packet \(index 0\) in dir 0 ignored, state ESTABLISHED$", "ignored"),
        "bad_flags": ("BAD_FLAGS", "BAD_FLAGS", r"^invalid tcp flag combination$", "invalid"),
        "bad_checksum": ("BAD_CHECKSUM", "BAD_CHECKSUM", r"^bad checksum$", "invalid"),
        "truncated": ("TRUNCATED", "TRUNCATED", r"^truncated packet$", "invalid"),
    },
    "pre-6.1": {
        "seq_over": ("SEQ_OVER", "SEQ_OVER", r"^SEQ is over the upper bound \(over the window of the receiver\)$", "invalid"),
        "ack_over": ("ACK_OVER", "ACK_OVER", r"^ACK is over the upper bound \(ACKed data not seen yet\)$", "invalid"),
        "sack_over": ("SACK_OVER", "ACK_OVER", r"^ACK is over the upper bound \(ACKed data not seen yet\)$", "invalid"),
        "seq_under": ("SEQ_UNDER", "SEQ_UNDER", r"^SEQ is under the lower bound \(already ACKed data retransmitted\)$", "invalid"),
        "ack_under": ("ACK_UNDER", "ACK_UNDER", r"^ACK is under the lower bound \(possible overly delayed ACK\)$", "invalid"),
        # No overshoot workaround before 5.19.9: the same segment is plain SEQ over.
        "overshot": ("SEQ_OVER", "SEQ_OVER", r"^SEQ is over the upper bound \(over the window of the receiver\)$", "invalid"),
        "invalid_rst": ("INVALID_RST", "INVALID_RST", r"^invalid rst$", "invalid"),
        "invalid_state": ("INVALID_STATE", "INVALID_STATE", r"^invalid state$", "invalid"),
        "ignored_state": ("IGNORED_STATE", "IGNORED_STATE", r"^invalid packet ignored in state ESTABLISHED$", "ignored"),
        "bad_flags": ("BAD_FLAGS", "BAD_FLAGS", r"^invalid tcp flag combination$", "invalid"),
        "bad_checksum": ("BAD_CHECKSUM", "BAD_CHECKSUM", r"^bad checksum$", "invalid"),
        "truncated": ("TRUNCATED", "TRUNCATED", r"^truncated packet$", "invalid"),
    },
}


def era_for(version: tuple[int, int, int]) -> str:
    return "6.1+" if version >= (6, 1, 0) else "pre-6.1"


def expectation(name: str, era: str, liberal: int) -> dict:
    """What the kernel should do with scenario `name`: log, verdict, counter deltas, drop."""
    label, kernel_reason, message_re, verdict = EXPECTED[era][name]
    if liberal and name in WINDOW_SCENARIOS:
        # be_liberal turns every window failure into ACCEPT, before logging (both eras).
        return {"era": era, "reason": label, "kernel_reason": None, "message_regex": None,
                "verdict": "accepted-liberal", "logged": False, "invalid_delta": 0, "dropped": False}
    return {"era": era, "reason": label, "kernel_reason": kernel_reason, "message_regex": message_re,
            "verdict": verdict, "logged": True, "invalid_delta": 1 if verdict == "invalid" else 0,
            "dropped": verdict == "invalid"}


# ---------------------------------------------------------------------------------------------
# Topology

@dataclass
class Topology:
    lab: netlab.NetLab
    client_ns: str
    server_ns: str
    client_if: str
    server_if: str
    counter: netlab.NftCounter
    injector: PacketSocket
    setup_seconds: float = 0.0
    modules: dict = field(default_factory=dict)

    def addr(self, family: str, side: str) -> str:
        client, server, _ = ADDRS[family]
        return client if side == "client" else server


def build_topology(lab: netlab.NetLab) -> Topology:
    t0 = time.time()
    modules = netlab.load_modules()
    cli, srv = lab.add_ns("cli"), lab.add_ns("srv")
    cif, sif = lab.if_name("c"), lab.if_name("s")
    lab.add_veth(cli, cif, CLIENT_MAC, srv, sif, SERVER_MAC)
    for ns, dev, mine, peer_mac, peer_side in ((cli, cif, 0, SERVER_MAC, 1), (srv, sif, 1, CLIENT_MAC, 0)):
        cmds = []
        for family, (a, b, plen) in ADDRS.items():
            own, peer = (a, b)[mine], (a, b)[peer_side]
            cmds.append(f"addr add {own}/{plen} dev {dev}" + (" nodad" if family == "ipv6" else ""))
            # static neighbours: no ARP/ND traffic, and injected frames need no resolution
            cmds.append(f"neigh replace {peer} lladdr {peer_mac} dev {dev} nud permanent")
        lab.ip_batch(ns, cmds)
    lab.enable_invalid_log(srv)
    netlab.write_sysctl("net.netfilter.nf_conntrack_checksum", 1, ns=srv, required=False)
    netlab.write_sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 0, ns=srv)
    netlab.install_firewall(srv)
    topo = Topology(lab, cli, srv, cif, sif, netlab.NftCounter(srv), PacketSocket(cli, cif),
                    modules=modules)
    topo.setup_seconds = time.time() - t0
    return topo


# ---------------------------------------------------------------------------------------------
# A live connection and what we learned about it

@dataclass
class Connection:
    family: str
    client_addr: str
    server_addr: str
    cport: int
    sport: int
    client: socket.socket
    server: socket.socket
    listener: socket.socket
    client_isn: int = 0
    server_isn: int = 0
    client_wscale: Optional[int] = None
    server_wscale: Optional[int] = None
    sack_perm: bool = False
    client_window_raw: int = 1024
    model: dict = field(default_factory=dict)

    @property
    def client_next(self) -> int:
        return (self.client_isn + 1 + len(REQUEST)) & M32

    @property
    def server_next(self) -> int:
        return (self.server_isn + 1 + len(RESPONSE)) & M32

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            try:
                # abortive close (RST): no FIN exchange or TIME_WAIT lingering into later scenarios
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            except OSError:
                pass
            sock.close()

    def describe(self) -> dict:
        return {"client_isn": self.client_isn, "server_isn": self.server_isn,
                "client_next": self.client_next, "server_next": self.server_next,
                "client_wscale": self.client_wscale, "server_wscale": self.server_wscale,
                "sack_perm": self.sack_perm, "model": self.model}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed during the warm-up exchange")
        buf += chunk
    return buf


def conntrack_model(frames: list, client: tuple[str, int], wscale_ok: bool,
                    client_wscale: int, server_wscale: int) -> dict:
    """What conntrack's window state should be after the sniffed frames (reference §4.1/§4.5).

    Per direction ('original' = client->server): td_end = max(seq + len), td_maxwin = max
    scaled window, td_maxend = max(peer ack + peer window), td_maxack = max ACK sent.
    Enough to predict the printed bounds; not a full tcp_in_window replica.
    """
    side = {"original": {"td_end": None, "td_maxend": None, "td_maxwin": 0, "td_maxack": None},
            "reply": {"td_end": None, "td_maxend": None, "td_maxwin": 0, "td_maxack": None}}

    def later(a, b):
        return b if a is None else (a if seq_after(a, b) else b) if b is not None else a

    for p in frames:
        d = "original" if (p.src, p.sport) == client else "reply"
        other = "reply" if d == "original" else "original"
        scale = (client_wscale if d == "original" else server_wscale) if wscale_ok else 0
        win = p.window if p.flags & SYN else p.window << scale
        end = (p.seq + p.seg_len) & M32
        s = side[d]
        if p.flags & SYN and s["td_end"] is None:
            s["td_maxend"] = end          # tcp_in_window init: td_end = td_maxend = end
        s["td_end"] = later(s["td_end"], end)
        s["td_maxwin"] = max(s["td_maxwin"], win or 1)
        if p.flags & ACK:
            s["td_maxack"] = later(s["td_maxack"], p.ack)
            side[other]["td_maxend"] = later(side[other]["td_maxend"], (p.ack + win) & M32)
    return side


def open_connection(topo: Topology, family: str, index: int) -> Connection:
    """Connect client -> server, exchange a request and a response, learn the numbers."""
    af = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    caddr, saddr = topo.addr(family, "client"), topo.addr(family, "server")
    cport, sport = CLIENT_PORT_BASE + index, SERVER_PORT_BASE + index
    with PacketSocket(topo.client_ns, topo.client_if) as sniffer:
        with netlab.netns(topo.server_ns):
            listener = socket.socket(af, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((saddr, sport))
        listener.listen(1)
        with netlab.netns(topo.client_ns):
            client = socket.socket(af, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind((caddr, cport))
        client.settimeout(10)
        listener.settimeout(10)
        client.connect((saddr, sport))
        server, _ = listener.accept()
        server.settimeout(10)
        client.sendall(REQUEST)
        _recv_exact(server, len(REQUEST))
        server.sendall(RESPONSE)
        _recv_exact(client, len(RESPONSE))
        frames = [f for f, _ in sniffer.drain(quiet=0.02)]
    conn = Connection(family, caddr, saddr, cport, sport, client, server, listener)
    parsed = []
    norm_c, norm_s = ipaddress.ip_address(caddr), ipaddress.ip_address(saddr)
    for raw in frames:
        p = parse_frame(raw)
        if p is None or {p.sport, p.dport} != {cport, sport}:
            continue
        if {ipaddress.ip_address(p.src), ipaddress.ip_address(p.dst)} != {norm_c, norm_s}:
            continue
        parsed.append(p)
        from_client = p.sport == cport
        if p.flags & SYN and from_client:
            conn.client_isn, conn.client_wscale = p.seq, p.options.get("wscale")
            conn.sack_perm = bool(p.options.get("sack_perm"))
        elif p.flags & SYN:
            conn.server_isn, conn.server_wscale = p.seq, p.options.get("wscale")
            conn.sack_perm = conn.sack_perm and bool(p.options.get("sack_perm"))
        elif from_client:
            conn.client_window_raw = p.window
    if not any(p.flags & SYN for p in parsed):
        raise RuntimeError(f"sniffer on {topo.client_if} saw no handshake for port {sport}")
    wscale_ok = conn.client_wscale is not None and conn.server_wscale is not None
    conn.model = conntrack_model(parsed, (caddr, cport), wscale_ok,
                                 conn.client_wscale or 0, conn.server_wscale or 0)
    conn.model["frames_seen"] = len(parsed)
    return conn


# ---------------------------------------------------------------------------------------------
# The segments

def build_segment(name: str, conn: Connection) -> tuple[Segment, Optional[int], bool]:
    """(segment, predicted printed bound on 6.1+ or None, whether that prediction is exact).

    ACK bounds depend only on the data the server sent (td_end), so they are exact; SEQ and
    ACK-under bounds also depend on window advertisements, which a late window update could
    move, so they are checked softly (oracle.bound_matches_model).
    """
    c, s = conn.client_next, conn.server_next
    orig, reply = conn.model["original"], conn.model["reply"]
    seg = Segment(src=conn.client_addr, dst=conn.server_addr, sport=conn.cport, dport=conn.sport,
                  seq=c, ack=s, flags=ACK, window=conn.client_window_raw)
    bound, exact = None, False
    if name == "seq_over":
        seg.seq, seg.flags, seg.payload = (c + (1 << 30)) & M32, ACK | PSH, b"x" * 100
        bound = (orig["td_maxend"] + 1) & M32
    elif name == "ack_over":
        seg.ack = (s + (1 << 30)) & M32
        bound, exact = (reply["td_end"] + 1) & M32, True
    elif name == "sack_over":
        left = (s + (1 << 30)) & M32
        seg.options = opt_nop() + opt_nop() + opt_sack([(left, left + 1448)])
        bound, exact = (reply["td_end"] + 1) & M32, True
    elif name == "seq_under":
        seg.seq, seg.flags, seg.payload = (c - (1 << 29)) & M32, ACK | PSH, b"x" * 100
        bound = (orig["td_end"] - reply["td_maxwin"] - 1) & M32
    elif name == "ack_under":
        seg.ack = (s - (1 << 29)) & M32
        bound = (reply["td_end"] - max(orig["td_maxwin"], MAXACKWINCONST) - 1) & M32
    elif name == "overshot":
        # Starts 1000 bytes past the window's right edge: beyond td_maxend, yet the overshoot
        # (~1.2 kB) stays far below one receiver window, which is what the workaround needs.
        seg.seq, seg.flags, seg.payload = (orig["td_maxend"] + 1000) & M32, ACK | PSH, b"x" * 200
        bound = (seg.seq + len(seg.payload) - orig["td_maxend"] + 1) & M32
    elif name == "invalid_rst":
        seg.seq, seg.ack, seg.flags = (c - 1000) & M32, 0, RST
    elif name == "invalid_state":
        seg.flags = SYN | ACK
        seg.options = opt_mss(1460) + opt_sack_perm() + opt_timestamps(1, 0) + opt_nop() + opt_wscale(7)
    elif name == "ignored_state":
        seg.seq, seg.ack, seg.flags, seg.window = (c + 100000) & M32, 0, SYN, 64240
        seg.options = opt_mss(1460) + opt_sack_perm() + opt_timestamps(1, 0) + opt_nop() + opt_wscale(7)
    elif name == "bad_flags":
        seg.ack, seg.flags = 0, SYN | FIN
    elif name == "bad_checksum":
        seg.flags, seg.payload, seg.bad_checksum = ACK | PSH, b"x" * 10, True
    elif name == "truncated":
        seg.truncate_to_header = True
    else:
        raise KeyError(name)
    return seg, bound, exact


# ---------------------------------------------------------------------------------------------
# One scenario

def _same_addr(a: Optional[str], b: str) -> bool:
    try:
        return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _flow_lines(lines: list[dict], seg: Segment) -> tuple[list, list]:
    """Split parsed log lines into those about the injected segment's direction and the rest."""
    mine, other = [], []
    for line in lines:
        if (_same_addr(line["src"], seg.src) and line["sport"] == seg.sport
                and line["dport"] == seg.dport):
            mine.append(line)
        else:
            other.append(line)
    return mine, other


def run_scenario(topo: Topology, klog: netlab.KernelLog, name: str, family: str, liberal: int,
                 index: int, era: str, settle: float) -> dict:
    start = time.time()
    netlab.write_sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", liberal, ns=topo.server_ns)
    conn = open_connection(topo, family, index)
    seg, bound, bound_exact = build_segment(name, conn)
    frame = seg.frame(SERVER_MAC, CLIENT_MAC)

    klog.read_new()                                   # discard anything from the set-up
    stats_before = netlab.read_ct_stats(topo.server_ns)
    nft_before = topo.counter.packets()
    inject_at = time.time()
    topo.injector.send(frame)
    # The veth delivers in softirq right after send(); poll the log rather than sleep blindly.
    lines, deadline, grace_until = [], time.time() + settle, None
    while True:
        lines += klog.read_conntrack()
        mine, _ = _flow_lines(lines, seg)
        now = time.time()
        if mine and grace_until is None:
            grace_until = now + min(0.05, settle)    # a second line may follow (lower timeout)
        if now >= deadline or (grace_until is not None and now >= grace_until):
            break
        time.sleep(0.005)
    lines += klog.read_conntrack()
    stats_after = netlab.read_ct_stats(topo.server_ns)
    nft_after = topo.counter.packets()
    end = time.time()
    conn.close()

    mine, other = _flow_lines(lines, seg)
    deltas = netlab.stats_delta(stats_before, stats_after)
    oracle = {
        "log": mine, "other_log": other,
        "kernel_reasons": [line["reason"] for line in mine],
        "messages": [line["message"] for line in mine],
        "bounds": [line["bound"] for line in mine],
        "invalid_delta": deltas.get("invalid", 0), "ignore_delta": deltas.get("ignore", 0),
        "ct_drop_delta": deltas.get("drop", 0), "stats_delta": deltas,
        "nft_drop_delta": nft_after - nft_before, "dropped": nft_after - nft_before > 0,
    }
    expected = expectation(name, era, liberal)
    expected["bound_model"] = bound if era == "6.1+" and expected["logged"] else None
    expected["bound_model_exact"] = bound_exact
    # informational for bounds that depend on window advertisements (see build_segment)
    oracle["bound_matches_model"] = (expected["bound_model"] in oracle["bounds"]
                                     if expected["bound_model"] is not None else None)
    record = {
        "id": f"{name}/{family}/liberal={liberal}", "name": name, "family": family,
        "liberal": liberal, "description": DESCRIPTIONS[name],
        "start": start, "inject_at": inject_at, "end": end,
        "segment": seg.describe(), "connection": conn.describe(),
        "expected": expected, "oracle": oracle,
    }
    record["mismatches"] = check(record)
    record["ok"] = not record["mismatches"]
    return record


def check(record: dict) -> list[str]:
    """Differences between expectation and oracle, as readable sentences."""
    import re
    exp, orc = record["expected"], record["oracle"]
    problems = []
    if exp["logged"]:
        if exp["kernel_reason"] not in orc["kernel_reasons"]:
            problems.append(f"expected a {exp['kernel_reason']} log line, got {orc['messages'] or 'none'}")
        elif not any(re.search(exp["message_regex"], m) for m in orc["messages"]):
            problems.append(f"log text {orc['messages']} does not match /{exp['message_regex']}/")
        if exp.get("bound_model_exact") and exp.get("bound_model") is not None:
            if exp["bound_model"] not in orc["bounds"]:
                problems.append(f"printed bound {orc['bounds']} != predicted {exp['bound_model']}")
    elif orc["messages"]:
        problems.append(f"expected no log line, got {orc['messages']}")
    if orc["invalid_delta"] != exp["invalid_delta"]:
        problems.append(f"invalid delta {orc['invalid_delta']} != expected {exp['invalid_delta']}")
    if orc["dropped"] != exp["dropped"]:
        problems.append(f"dropped={orc['dropped']} != expected {exp['dropped']}")
    return problems


# ---------------------------------------------------------------------------------------------
# The run

def plan(only: Optional[list[str]], ipv6_too: bool, liberal: str) -> list[tuple[str, str, int]]:
    """(name, family, liberal) in run order; IPv6 covers the window reasons."""
    names = [n for n in ALL_SCENARIOS if not only or n in only]
    unknown = set(only or ()) - set(ALL_SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(ALL_SCENARIOS)}")
    modes = {"0": [0], "1": [1], "both": [0, 1]}[liberal]
    out = []
    for mode in modes:
        out += [(n, "ipv4", mode) for n in names]
    if ipv6_too:
        for mode in modes:
            out += [(n, "ipv6", mode) for n in names if n in WINDOW_SCENARIOS]
    return out


def wait_for_file(path: str, timeout: float) -> float:
    t0 = time.time()
    while not os.path.exists(path):
        if time.time() - t0 > timeout:
            raise SystemExit(f"--wait-for {path}: not created within {timeout:.0f} s")
        time.sleep(0.05)
    return time.time() - t0


def run_all(args) -> dict:
    version = netlab.kernel_version()
    era = args.era or era_for(version)
    t0 = time.time()
    doc = {"kernel": netlab.kernel_release(), "kernel_version": list(version), "era": era,
           "python": sys.version.split()[0], "started": t0, "scenarios": [], "timings": {}}
    lab = netlab.NetLab()
    klog = netlab.KernelLog()
    topo = None
    try:
        topo = build_topology(lab)
        doc["topology"] = {"client_ns": topo.client_ns, "server_ns": topo.server_ns,
                           "client_if": topo.client_if, "server_if": topo.server_if,
                           "addresses": ADDRS, "modules": topo.modules}
        doc["timings"]["setup_s"] = round(topo.setup_seconds, 3)
        if args.wait_for:
            doc["timings"]["wait_s"] = round(wait_for_file(args.wait_for, args.wait_timeout), 3)
        t_run = time.time()
        for index, (name, family, liberal) in enumerate(plan(args.only, args.ipv6_too, args.liberal)):
            try:
                rec = run_scenario(topo, klog, name, family, liberal, index, era, args.settle)
            except Exception as exc:          # record it and go on: one broken case != no results
                rec = {"id": f"{name}/{family}/liberal={liberal}", "name": name, "family": family,
                       "liberal": liberal, "description": DESCRIPTIONS[name],
                       "start": None, "inject_at": None, "end": time.time(),
                       "expected": expectation(name, era, liberal), "oracle": None,
                       "error": f"{type(exc).__name__}: {exc}",
                       "mismatches": [f"scenario failed: {type(exc).__name__}: {exc}"], "ok": False}
            doc["scenarios"].append(rec)
            if not args.quiet:
                print(summary_line(rec), flush=True)
        doc["timings"]["scenarios_s"] = round(time.time() - t_run, 3)
    finally:
        t_down = time.time()
        if topo is not None:
            topo.injector.close()
            topo.counter.close()
        klog.close()
        lab.close()
        doc["timings"]["teardown_s"] = round(time.time() - t_down, 3)
        doc["finished"] = time.time()
        doc["timings"]["total_s"] = round(doc["finished"] - t0, 3)
    doc["ok"] = all(r["ok"] for r in doc["scenarios"])
    return doc


def summary_line(rec: dict) -> str:
    orc = rec["oracle"]
    if orc is None:
        return f"{rec['id']:<34} ERROR: {rec['error']}"
    msg = "; ".join(orc["messages"]) or "(no log)"
    status = "ok" if rec["ok"] else "MISMATCH: " + " / ".join(rec["mismatches"])
    return (f"{rec['id']:<34} invalid={orc['invalid_delta']} dropped={str(orc['dropped']):<5} "
            f"{msg:<70} {status}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.lab.scenarios", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="set up namespaces and run the scenarios (root)")
    run_p.add_argument("--only", nargs="+", metavar="NAME", help="scenario names (see `list`)")
    run_p.add_argument("--ipv6-too", action="store_true", help="also run the window reasons over IPv6")
    run_p.add_argument("--liberal", choices=("0", "1", "both"), default="both",
                       help="nf_conntrack_tcp_be_liberal values to run (default both)")
    run_p.add_argument("--out", metavar="FILE.json", help="write the results document here")
    run_p.add_argument("--wait-for", metavar="FILE", help="after set-up, wait until FILE exists")
    run_p.add_argument("--wait-timeout", type=float, default=600.0)
    run_p.add_argument("--settle", type=float, default=0.3,
                       help="max seconds to wait for a log line after each injection (default 0.3)")
    run_p.add_argument("--era", choices=("pre-6.1", "6.1+"), help="override the detected kernel era")
    run_p.add_argument("--check", action="store_true", help="exit 1 if any scenario mismatches")
    run_p.add_argument("--quiet", action="store_true")
    sub.add_parser("list", help="list the scenarios")
    args = parser.parse_args(argv)

    if args.cmd == "list":
        for name in ALL_SCENARIOS:
            kind = "window" if name in WINDOW_SCENARIOS else "other"
            print(f"{name:<14} {kind:<7} {DESCRIPTIONS[name]}")
        return 0
    if os.geteuid() != 0:
        print("scenarios need root (namespaces, AF_PACKET, nft)", file=sys.stderr)
        return 2
    doc = run_all(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    bad = [r["id"] for r in doc["scenarios"] if not r["ok"]]
    if not args.quiet:
        print(f"{len(doc['scenarios'])} scenarios on {doc['kernel']} (era {doc['era']}) in "
              f"{doc['timings'].get('total_s')} s; mismatches: {', '.join(bad) or 'none'}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
