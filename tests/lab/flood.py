"""Floods of INVALID segments in known proportions, for `conntrace top` and the benchmarks.

Why this exists: `top` must count exactly under a flood, and the benchmarks need floods at
chosen rates and from many distinct senders. Two kinds:

  peers     real connections from a few client addresses, then the same out-of-window data
            segment (SEQ over the upper bound, INVALID on every kernel) repeated per peer
            in the requested proportions;
  distinct  one SYN+FIN segment ("invalid tcp flag combination", INVALID on every kernel)
            from each of N distinct source addresses in 198.18.0.0/15 (the benchmarking
            range), no connection needed.

    python3 -m tests.lab.flood peers --count 50000 30000 20000 [--rate PPS] [--wait-for F] --out F.json
    python3 -m tests.lab.flood distinct --senders 100000 [--rate PPS] [--wait-for F] --out F.json

Results: what was injected per sender, the conntrack invalid/ignore deltas of the server's
netns, the nft drop counter delta, and the achieved rate.
"""
from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import sys
import time

from . import netlab
from .packets import ACK, FIN, PSH, SYN, Segment
from .scenarios import CLIENT_MAC, SERVER_MAC, ADDRS, build_topology, open_connection, wait_for_file

PEER_ADDRS = ["10.213.0.101", "10.213.0.102", "10.213.0.103", "10.213.0.104", "10.213.0.105"]
DISTINCT_NET = ipaddress.ip_network("198.18.0.0/15")


def paced_send(sock, frames_in_order, rate: float) -> float:
    """Send every frame, at most `rate` per second (0: as fast as possible); returns seconds."""
    t0 = time.monotonic()
    batch = 256
    for i in range(0, len(frames_in_order), batch):
        for frame in frames_in_order[i:i + batch]:
            sock.send(frame)
        if rate > 0:
            ahead = (i + batch) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    return time.monotonic() - t0


def _connection_from(topo, peer: str, index: int):
    """open_connection() with another client address: the scenario topology knows one client
    address per family, so give it a view whose client address is this peer."""
    view = copy.copy(topo)
    view.addr = lambda family, side: peer if side == "client" else ADDRS[family][1]
    return open_connection(view, "ipv4", index)


def interleave(counts: list[int]) -> list[int]:
    """Peer indexes in a smooth mix (not one peer after another), deterministic."""
    total = sum(counts)
    sent = [0] * len(counts)
    order = []
    for n in range(1, total + 1):
        # the peer furthest behind its share goes next
        k = max(range(len(counts)), key=lambda j: counts[j] * n / total - sent[j])
        sent[k] += 1
        order.append(k)
    return order


def run_peers(counts: list[int], rate: float, wait_for: str | None) -> dict:
    with netlab.NetLab() as lab:
        topo = build_topology(lab)
        peers = PEER_ADDRS[:len(counts)]
        lab.ip_batch(topo.client_ns, [f"addr add {p}/24 dev {topo.client_if}" for p in peers])
        lab.ip_batch(topo.server_ns, [f"neigh replace {p} lladdr {CLIENT_MAC} dev {topo.server_if} nud permanent"
                                      for p in peers])
        frames = []
        conns = []
        for i, peer in enumerate(peers):
            conn = _connection_from(topo, peer, 900 + i)
            conns.append(conn)
            seg = Segment(peer, conn.server_addr, conn.cport, conn.sport,
                          seq=(conn.client_next + (1 << 30)) & 0xFFFFFFFF, ack=conn.server_next,
                          flags=ACK | PSH, payload=b"x" * 16)
            frames.append(seg.frame(SERVER_MAC, CLIENT_MAC))
        waited = wait_for_file(wait_for, 600) if wait_for else 0.0
        order = [frames[k] for k in interleave(counts)]
        before, drops_before = netlab.read_ct_stats(topo.server_ns), topo.counter.packets()
        seconds = paced_send(topo.injector, order, rate)
        time.sleep(0.5)
        after, drops_after = netlab.read_ct_stats(topo.server_ns), topo.counter.packets()
        for conn in conns:
            conn.close()
        netns_inode = _netns_inode(topo.server_ns)
        topo.counter.close()
        topo.injector.close()
    return {"kind": "peers", "reason": "SEQ_OVER",
            "injected": {p: n for p, n in zip(peers, counts)}, "total": sum(counts),
            "server_netns": netns_inode, "seconds": seconds, "rate_achieved": sum(counts) / seconds,
            "rate_asked": rate, "waited": waited,
            "ct_delta": netlab.stats_delta(before, after), "nft_drop_delta": drops_after - drops_before}


def run_distinct(senders: int, rate: float, wait_for: str | None) -> dict:
    with netlab.NetLab() as lab:
        topo = build_topology(lab)
        server = ADDRS["ipv4"][1]
        hosts = DISTINCT_NET.hosts()
        frames = []
        for i in range(senders):
            src = str(next(hosts))
            seg = Segment(src, server, 1024 + i % 60000, 80, seq=i, flags=SYN | FIN)
            frames.append(seg.frame(SERVER_MAC, CLIENT_MAC))
        waited = wait_for_file(wait_for, 600) if wait_for else 0.0
        before, drops_before = netlab.read_ct_stats(topo.server_ns), topo.counter.packets()
        seconds = paced_send(topo.injector, frames, rate)
        time.sleep(0.5)
        after, drops_after = netlab.read_ct_stats(topo.server_ns), topo.counter.packets()
        netns_inode = _netns_inode(topo.server_ns)
        topo.counter.close()
        topo.injector.close()
    return {"kind": "distinct", "reason": "BAD_FLAGS", "senders": senders, "total": senders,
            "server_netns": netns_inode, "seconds": seconds, "rate_achieved": senders / seconds,
            "rate_asked": rate, "waited": waited,
            "ct_delta": netlab.stats_delta(before, after), "nft_drop_delta": drops_after - drops_before}


def _netns_inode(name: str) -> int:
    import os
    return os.stat(os.path.join(netlab.NETNS_DIR, name)).st_ino


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.lab.flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("peers")
    a.add_argument("--count", type=int, nargs="+", required=True, help="segments per peer")
    b = sub.add_parser("distinct")
    b.add_argument("--senders", type=int, required=True)
    for s in (a, b):
        s.add_argument("--rate", type=float, default=0.0, help="packets per second (0: flat out)")
        s.add_argument("--wait-for", metavar="FILE")
        s.add_argument("--out", metavar="FILE.json")
    args = p.parse_args(argv)
    if args.cmd == "peers":
        if not 1 <= len(args.count) <= len(PEER_ADDRS):
            p.error(f"between 1 and {len(PEER_ADDRS)} peers")
        result = run_peers(args.count, args.rate, args.wait_for)
    else:
        result = run_distinct(args.senders, args.rate, args.wait_for)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(f"flood: {result['total']} segments in {result['seconds']:.1f} s "
          f"({result['rate_achieved']:.0f}/s); invalid delta {result['ct_delta'].get('invalid')}, "
          f"nft drops {result['nft_drop_delta']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
