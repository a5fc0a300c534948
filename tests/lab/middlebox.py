"""The seed story: a sequence-randomizing middlebox that forgets SACK blocks, end to end.

Why this exists: conntrace was started because of transfers that crawl or stall behind a
Cisco ASA/FTD doing "TCP sequence number randomization" in front of a Linux stateful
firewall. The ASA adds a constant to the protected host's sequence numbers (and subtracts it
from the ACKs coming back) but leaves SACK blocks alone. Linux conntrack takes the highest
SACK right edge as the effective ACK (tcp_sack()), sees it far beyond anything the server
sent, and marks the segment INVALID: "ACK is over upper bound" (conntrace labels it
SACK_OVER). A `ct state invalid drop` rule then eats exactly the ACKs that carry loss
information, and the server recovers only by retransmission timeouts -- or not at all.

Topology (all namespaces throw-away, named ctl-<id>-*):

    client ns --veth-- middlebox ns --veth-- server ns (nft: established accept, invalid drop)
    10.214.1.2         10.214.1.1 | 10.214.2.1        10.214.2.2

The middlebox routes in user space (kernel forwarding off): an AF_PACKET loop in a child
process rewrites MACs and TTL, adds OFFSET to the server's sequence numbers
(server->client), subtracts it from the client's ACK numbers (client->server), does NOT touch
SACK blocks, recomputes checksums, and drops every Nth server->client data segment so that
the client has holes to SACK. Offloads are off on every veth so it handles MTU-sized frames.

The server then sends SIZE MB to the client (a download) with be_liberal=0 (expected: stall,
capped by --timeout) and =1 (expected: completes), and the kernel oracle is recorded.

    python3 -m tests.lab.middlebox run [--liberal 0|1|both] [--size MB] [--timeout S]
                                       [--loss-every N] [--keep-running SECONDS]
                                       [--wait-for FILE] --out FILE.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Optional

from . import netlab
from .packets import (ACK, ETH_P_IP, OPT_SACK, PACKET_OUTGOING, internet_checksum, mac_bytes,
                      parse_options)

M32 = 0xFFFFFFFF
# Like an ASA's random ISN offset. Below 2**31 so that, seen from the server, an untranslated
# SACK edge lies *after* (beyond) its data, which is the case that breaks conntrack.
OFFSET = 0x3B9ACA00

CLIENT_MAC, MB_CLIENT_MAC = "02:c8:00:00:01:02", "02:c8:00:00:01:01"
SERVER_MAC, MB_SERVER_MAC = "02:c8:00:00:02:02", "02:c8:00:00:02:01"
CLIENT_IP, MB_CLIENT_IP = "10.214.1.2", "10.214.1.1"
SERVER_IP, MB_SERVER_IP = "10.214.2.2", "10.214.2.1"
SERVER_PORT = 5001


# ---------------------------------------------------------------------------------------------
# The forwarder (runs in a child process inside the middlebox netns)

def rewrite_ipv4_tcp(frame: bytes, eth_header: bytes, seq_delta: int, ack_delta: int) -> tuple[bytes, dict]:
    """Route one Ethernet/IPv4 frame: new MACs, TTL-1, seq += seq_delta, ack += ack_delta.

    SACK blocks are deliberately left as they are (the middlebox bug). Checksums are
    recomputed in full, so a CHECKSUM_PARTIAL frame from a veth is also handled.
    Returns (new frame or b"" to drop, facts about the segment).
    """
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    ip = bytearray(frame[14:14 + total])            # drop Ethernet padding, if any
    if ip[8] <= 1:
        return b"", {"ttl_expired": True}
    ip[8] -= 1
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", internet_checksum(bytes(ip[:ihl])))
    facts = {"tcp": False}
    if ip[9] == 6 and total >= ihl + 20:
        t = ihl
        doff = (ip[t + 12] >> 4) * 4
        flags = ip[t + 13]
        facts = {"tcp": True, "payload": total - ihl - doff, "flags": flags, "sack": False}
        if seq_delta:
            seq = struct.unpack_from("!I", ip, t + 4)[0]
            struct.pack_into("!I", ip, t + 4, (seq + seq_delta) & M32)
        if ack_delta and flags & ACK:
            ack = struct.unpack_from("!I", ip, t + 8)[0]
            struct.pack_into("!I", ip, t + 8, (ack + ack_delta) & M32)
        if doff > 20 and OPT_SACK in ip[t + 20:t + doff]:
            facts["sack"] = "sack" in parse_options(bytes(ip[t + 20:t + doff]))
        ip[t + 16:t + 18] = b"\0\0"
        pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, 6, total - ihl)
        ip[t + 16:t + 18] = struct.pack("!H", internet_checksum(pseudo + bytes(ip[t:])))
    return eth_header + bytes(ip), facts


def forward_loop(ns: str, if_client: str, if_server: str, offset: int, loss_every: int,
                 stop_fd: int, report_fd: int, ready_fd: int) -> None:
    """Bridge-route between the two middlebox veths until stop_fd becomes readable.

    Writes one byte to ready_fd once both sockets are bound: a SYN sent before that would be
    lost and cost the client a 1 s SYN retransmission timeout.
    """
    with netlab.netns(ns):
        to_client = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        to_server = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    to_client.bind((if_client, ETH_P_IP))
    to_server.bind((if_server, ETH_P_IP))
    for s in (to_client, to_server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setblocking(False)
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    eth_to_client = mac_bytes(CLIENT_MAC) + mac_bytes(MB_CLIENT_MAC) + b"\x08\x00"
    eth_to_server = mac_bytes(SERVER_MAC) + mac_bytes(MB_SERVER_MAC) + b"\x08\x00"
    stats = collections.Counter()
    server_data_segments = 0
    stop = False
    while not stop:
        ready, _, _ = select.select([to_client, to_server, stop_fd], [], [], 1.0)
        if stop_fd in ready:
            stop = True
        for sock in ready:
            if sock is stop_fd:
                continue
            from_server = sock is to_server
            for _ in range(256):                       # drain in batches, stay responsive
                try:
                    frame, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING or len(frame) < 34:
                    continue
                if from_server:
                    out, facts = rewrite_ipv4_tcp(frame, eth_to_client, offset, 0)
                    if facts.get("tcp") and facts["payload"] > 0:
                        server_data_segments += 1
                        if loss_every and server_data_segments % loss_every == 0:
                            stats["s2c_data_dropped"] += 1
                            continue
                    stats["s2c_forwarded"] += 1
                    target = to_client
                else:
                    out, facts = rewrite_ipv4_tcp(frame, eth_to_server, 0, -offset)
                    stats["c2s_forwarded"] += 1
                    if facts.get("sack"):
                        stats["c2s_sack_untranslated"] += 1
                    target = to_server
                if not out:
                    stats["ttl_expired"] += 1
                    continue
                try:
                    target.send(out)
                except OSError:
                    stats["send_errors"] += 1
    os.write(report_fd, json.dumps(dict(stats)).encode())


class Forwarder:
    """The forwarder child process; `stop()` returns its counters."""

    def __init__(self, ns: str, if_client: str, if_server: str, offset: int, loss_every: int):
        self.stop_r, self.stop_w = os.pipe()
        self.report_r, self.report_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                              # child
            code = 0
            try:
                os.close(self.stop_w)
                os.close(self.report_r)
                os.close(ready_r)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                forward_loop(ns, if_client, if_server, offset, loss_every, self.stop_r,
                             self.report_w, ready_w)
            except BaseException as exc:              # report, never return into the parent's code
                try:
                    os.write(self.report_w, json.dumps({"error": repr(exc)}).encode())
                except OSError:
                    pass
                code = 1
            os._exit(code)
        os.close(self.stop_r)
        os.close(self.report_w)
        os.close(ready_w)
        os.read(ready_r, 1)               # b"" if the child died first; stop() reports why
        os.close(ready_r)

    def stop(self) -> dict:
        os.write(self.stop_w, b"x")
        os.close(self.stop_w)
        chunks = []
        while True:
            chunk = os.read(self.report_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self.report_r)
        os.waitpid(self.pid, 0)
        try:
            return json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            return {"error": "unreadable report"}


# ---------------------------------------------------------------------------------------------
# Topology

class Topology:
    def __init__(self, lab: netlab.NetLab):
        self.lab = lab
        self.client_ns, self.mb_ns, self.server_ns = lab.add_ns("mcli"), lab.add_ns("mbox"), lab.add_ns("msrv")
        self.if_c, self.if_m0 = lab.if_name("mc"), lab.if_name("m0")
        self.if_m1, self.if_s = lab.if_name("m1"), lab.if_name("ms")
        lab.add_veth(self.client_ns, self.if_c, CLIENT_MAC, self.mb_ns, self.if_m0, MB_CLIENT_MAC)
        lab.add_veth(self.mb_ns, self.if_m1, MB_SERVER_MAC, self.server_ns, self.if_s, SERVER_MAC)
        lab.ip_batch(self.client_ns, [f"addr add {CLIENT_IP}/24 dev {self.if_c}",
                                      f"neigh replace {MB_CLIENT_IP} lladdr {MB_CLIENT_MAC} dev {self.if_c} nud permanent",
                                      f"route add default via {MB_CLIENT_IP}"])
        lab.ip_batch(self.mb_ns, [f"addr add {MB_CLIENT_IP}/24 dev {self.if_m0}",
                                  f"addr add {MB_SERVER_IP}/24 dev {self.if_m1}",
                                  f"neigh replace {CLIENT_IP} lladdr {CLIENT_MAC} dev {self.if_m0} nud permanent",
                                  f"neigh replace {SERVER_IP} lladdr {SERVER_MAC} dev {self.if_m1} nud permanent"])
        lab.ip_batch(self.server_ns, [f"addr add {SERVER_IP}/24 dev {self.if_s}",
                                      f"neigh replace {MB_SERVER_IP} lladdr {MB_SERVER_MAC} dev {self.if_s} nud permanent",
                                      f"route add default via {MB_SERVER_IP}"])
        # The kernel must not forward (our user-space loop does); it then drops silently.
        netlab.write_sysctl("net.ipv4.ip_forward", 0, ns=self.mb_ns)
        self.offloads = {}
        for ns, dev in ((self.client_ns, self.if_c), (self.mb_ns, self.if_m0),
                        (self.mb_ns, self.if_m1), (self.server_ns, self.if_s)):
            self.offloads[dev] = netlab.disable_offloads(ns, dev)
        lab.enable_invalid_log(self.server_ns)
        netlab.install_firewall(self.server_ns)
        self.counter = netlab.NftCounter(self.server_ns)

    def describe(self) -> dict:
        return {"client_ns": self.client_ns, "middlebox_ns": self.mb_ns, "server_ns": self.server_ns,
                "client": CLIENT_IP, "server": SERVER_IP, "offset": OFFSET,
                "interfaces": [self.if_c, self.if_m0, self.if_m1, self.if_s],
                "offloads_disabled": self.offloads}


# ---------------------------------------------------------------------------------------------
# One transfer

# No byte for this long = stalled. In the liberal run every lost segment costs one RTO (the
# SACK blocks are garbage, so no fast retransmit), and a slow, jittery emulated guest pushes
# RTOs past 6 s: seen once on 5.10 with the guest on one host thread and the host busy.
STALL_AFTER = 15.0


def transfer(topo: Topology, klog: netlab.KernelLog, liberal: int, size: int, timeout: float,
             port: int, loss_every: int, stall_after: float = STALL_AFTER) -> dict:
    """Download `size` bytes server -> client through the middlebox; record time and oracle.

    The transfer counts as stalled when no byte arrives for `stall_after` seconds (several
    RTO backoffs; with SACK-bearing ACKs dropped the server never recovers) or when
    `timeout` passes first.
    """
    netlab.write_sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", liberal, ns=topo.server_ns)
    klog.read_new()
    stats_before = netlab.read_ct_stats(topo.server_ns)
    nft_before = topo.counter.packets()
    forwarder = Forwarder(topo.mb_ns, topo.if_m0, topo.if_m1, OFFSET, loss_every)
    mb_stats = {}
    try:
        with netlab.netns(topo.server_ns):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVER_IP, port))
        listener.listen(1)
        listener.settimeout(10)
        sender_error = []

        def serve():
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(timeout + 10)
                    block = b"\xa5" * 65536
                    left = size
                    while left > 0:
                        conn.sendall(block[:min(left, len(block))])
                        left -= min(left, len(block))
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)                           # wait for the client's close
            except OSError as exc:
                sender_error.append(repr(exc))

        thread = threading.Thread(target=serve, daemon=True)
        with netlab.netns(topo.client_ns):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        start = time.time()
        thread.start()
        received, stalled, error = 0, False, None
        last_progress = start
        progress = []                                      # (seconds, bytes): where it stalled
        try:
            client.settimeout(10)
            client.connect((SERVER_IP, port))
            deadline = start + timeout
            next_mark = start + 1.0
            while received < size:
                now = time.time()
                if now >= deadline or (stall_after and now - last_progress >= stall_after):
                    stalled = True
                    break
                client.settimeout(min(0.5, deadline - now))
                try:
                    chunk = client.recv(262144)
                except socket.timeout:
                    chunk = None
                if chunk == b"":
                    break
                if chunk:
                    received += len(chunk)
                    last_progress = time.time()
                if time.time() >= next_mark:
                    progress.append((round(time.time() - start, 2), received))
                    next_mark += 1.0
        except OSError as exc:
            error = repr(exc)
        end = time.time()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
        thread.join(timeout=5)
        listener.close()
    finally:
        mb_stats = forwarder.stop()          # also on errors: never leave the child running
    time.sleep(0.05)
    lines = [l for l in klog.read_conntrack() if l["sport"] == port or l["dport"] == port]
    stats_after = netlab.read_ct_stats(topo.server_ns)
    nft_after = topo.counter.packets()
    reasons = collections.Counter(l["reason"] for l in lines)
    # A SACK-driven ACK_OVER: the ACK field itself is below the printed bound (6.1+ prints it).
    sack_driven = sum(1 for l in lines if l["reason"] == "ACK_OVER" and l["bound"] is not None
                      and l["fields"].get("ACK", "").isdigit()
                      and ((l["bound"] - int(l["fields"]["ACK"])) & M32) < 0x80000000)
    deltas = netlab.stats_delta(stats_before, stats_after)
    elapsed = end - start
    return {
        "liberal": liberal, "size": size, "received": received,
        "completed": received >= size, "stalled": stalled, "error": error,
        "sender_error": sender_error[0] if sender_error else None,
        "stall_after": stall_after, "timeout": timeout,
        "last_progress_s": round(last_progress - start, 3) if received else None,
        "seconds": round(elapsed, 3), "mbit_s": round(received * 8 / elapsed / 1e6, 2) if elapsed else None,
        "start": start, "end": end, "port": port, "progress": progress,
        "middlebox": mb_stats,
        "oracle": {
            "log_lines": len(lines), "reasons": dict(reasons), "sack_driven_ack_over": sack_driven,
            "log_sample": lines[:10],
            "invalid_delta": deltas.get("invalid", 0), "ignore_delta": deltas.get("ignore", 0),
            "stats_delta": deltas, "nft_drop_delta": nft_after - nft_before,
        },
    }


def summary_line(t: dict) -> str:
    state = "completed" if t["completed"] else ("STALLED" if t["stalled"] else "incomplete")
    o = t["oracle"]
    return (f"be_liberal={t['liberal']}: {state} {t['received'] / 1e6:.2f}/{t['size'] / 1e6:.2f} MB "
            f"in {t['seconds']:.2f} s; conntrack invalid +{o['invalid_delta']}, nft drops "
            f"+{o['nft_drop_delta']}, kernel log {o['reasons'] or '-'} "
            f"(SACK-driven ACK over: {o['sack_driven_ack_over']}); middlebox {t['middlebox']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.lab.middlebox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="run the transfer(s) (root)")
    run_p.add_argument("--liberal", choices=("0", "1", "both"), default="both")
    run_p.add_argument("--size", type=float, default=3.0, help="MB to download (default 3)")
    run_p.add_argument("--timeout", type=float, default=60.0,
                       help="hard cap per transfer, seconds (default 60)")
    run_p.add_argument("--stall-after", type=float, default=STALL_AFTER,
                       help=f"seconds without progress that count as a stall (default {STALL_AFTER:g}; 0: off)")
    run_p.add_argument("--loss-every", type=int, default=200,
                       help="drop every Nth server->client data segment (default 200, i.e. 0.5%%; "
                            "0: none). Each loss costs the liberal run one RTO, so more loss "
                            "mostly slows the lab down")
    run_p.add_argument("--keep-running", type=float, metavar="SECONDS",
                       help="repeat transfers until SECONDS have passed (for conntrace top/report)")
    run_p.add_argument("--wait-for", metavar="FILE", help="after set-up, wait until FILE exists")
    run_p.add_argument("--wait-timeout", type=float, default=600.0)
    run_p.add_argument("--out", metavar="FILE.json")
    run_p.add_argument("--check", action="store_true",
                       help="exit 1 unless be_liberal=0 stalls/crawls and be_liberal=1 completes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the middlebox lab needs root", file=sys.stderr)
        return 2

    modes = {"0": [0], "1": [1], "both": [0, 1]}[args.liberal]
    size = int(args.size * 1_000_000)
    t0 = time.time()
    doc = {"kernel": netlab.kernel_release(), "kernel_version": list(netlab.kernel_version()),
           "python": sys.version.split()[0], "started": t0, "transfers": [], "timings": {}}
    lab = netlab.NetLab()
    klog = netlab.KernelLog()
    try:
        netlab.load_modules()
        topo = Topology(lab)
        doc["topology"] = topo.describe()
        doc["timings"]["setup_s"] = round(time.time() - t0, 3)
        if args.wait_for:
            t_wait = time.time()
            while not os.path.exists(args.wait_for):
                if time.time() - t_wait > args.wait_timeout:
                    raise SystemExit(f"--wait-for {args.wait_for}: not created in time")
                time.sleep(0.05)
        port = SERVER_PORT
        run_until = time.time() + args.keep_running if args.keep_running else None
        while True:
            for mode in modes:
                timeout = args.timeout
                if run_until is not None:
                    if run_until - time.time() < 2.0:      # too short to show anything
                        break
                    timeout = min(timeout, run_until - time.time())
                result = transfer(topo, klog, mode, size, timeout, port, args.loss_every,
                                  args.stall_after)
                port += 1
                doc["transfers"].append(result)
                print(summary_line(result), flush=True)
                if run_until is not None and time.time() >= run_until:
                    break
            if run_until is None or run_until - time.time() < 2.0:
                break
        topo.counter.close()
    finally:
        klog.close()
        lab.close()
        doc["finished"] = time.time()
        doc["timings"]["total_s"] = round(doc["finished"] - t0, 3)

    by_mode = {}
    for t in doc["transfers"]:
        by_mode.setdefault(t["liberal"], t)               # first transfer of each mode
    doc["verdict"] = {
        "strict_stalled_or_crawled": (not by_mode[0]["completed"] or
                                      (1 in by_mode and by_mode[0]["seconds"] > 3 * by_mode[1]["seconds"]))
        if 0 in by_mode else None,
        "liberal_completed": by_mode[1]["completed"] if 1 in by_mode else None,
    }
    for mode in sorted(by_mode):
        t = by_mode[mode]
        if t["completed"]:
            outcome = "completed"
        else:
            outcome = (f"STALLED: {t['received'] / 1e6:.2f} MB by {t['last_progress_s'] or 0:.2f} s, "
                       f"then nothing until it was given up")
        print(f"transfer time with be_liberal={mode}: {t['seconds']:.2f} s ({outcome})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    if args.check:
        ok = all(v in (True, None) for v in doc["verdict"].values())
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
