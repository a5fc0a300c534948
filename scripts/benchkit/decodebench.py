"""Unit-level benchmark of conntrace's user-space decode path, on this machine (no BPF).

    python3 scripts/benchkit/decodebench.py [--seconds S] [--json]

Raw records are built with the same ctypes struct the probe receives (conntrace.decode.CtEvent,
checked against bpf/conntrace.h), in the mix a flood produces on each kernel era:

  deferred SEQ_OVER (IPv4), variadic ACK_OVER with a SACK block (IPv4), pre-6.1 "%s" SEQ_OVER
  (IPv6), state-machine INVALID_STATE, and tcp_error BAD_FLAGS (no conntrack entry).

Measured per single core (one Python thread), in events/s:
  parse        bytes -> CtEvent                       (decode.parse_record)
  decode       bytes -> Event                         (decode.decode_record)
  json         bytes -> Event -> to_dict -> NDJSON    (what `trace --json` does per event)
  table        bytes -> Event -> render.trace_line    (what `trace` does per event)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import socket
import struct
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from conntrace import decode as d  # noqa: E402
from conntrace import render  # noqa: E402
from conntrace.ndjson import dumps  # noqa: E402

SENDER = dict(td_end=1000, td_maxend=70000, td_maxwin=64000, td_maxack=5000, td_scale=7, flags=0x03)
RECEIVER = dict(td_end=5000, td_maxend=80000, td_maxwin=65000, td_maxack=1000, td_scale=7, flags=0x03)


def _ip4(src, dst, total):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))


def _ip6(src, dst, plen):
    return struct.pack("!IHBB16s16s", 6 << 28, plen, 6, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst))


def _tcp(sport, dport, seq, ack, flags, win, options=b""):
    options += b"\x01" * (-len(options) % 4)
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, ((20 + len(options)) // 4) << 4, flags, win, 0, 0) + options


def _tuple(src, sport, dst, dport, family):
    t = d.CtTuple()
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s, dd = socket.inet_pton(af, src), socket.inet_pton(af, dst)
    ctypes.memmove(t.src, s, len(s))
    ctypes.memmove(t.dst, dd, len(dd))
    t.sport, t.dport = socket.htons(sport), socket.htons(dport)
    t.l3num, t.protonum = (2 if family == 4 else 10), 6
    return t


def record(*, source, fmt=b"", string=b"", args=(), value=None, ret=0, log_type=0, tcp=None, family=4,
           payload=16, have_ct=True, state=3, peer=1) -> bytes:
    r = d.CtEvent()
    r.ts_ns = 5_000_000_000 + peer
    r.source, r.netns, r.dir, r.ct_status = source, 4026532234, 0, 0b1110
    r.flags = d.F_HAVE_PKT | d.F_HAVE_TCPH | d.F_HAVE_KNOBS | (d.F_HAVE_CT if have_ct else 0)
    if value is not None:
        r.value, r.flags = value, r.flags | d.F_HAVE_VALUE
    r.ret, r.log_type = ret, log_type
    for i, a in enumerate(args):
        r.args[i] = a
    r.fmt, r.str = fmt, string
    if have_ct:
        for i, s in enumerate((SENDER, RECEIVER)):
            for k, v in s.items():
                setattr(r.tcp.seen[i], k, v)
        r.tcp.state = state
    tcp = tcp if tcp is not None else _tcp(40000, 20000, 1000 + (1 << 30), 5000, 0x18, 501)
    src = f"10.213.{peer >> 8 & 255}.{peer & 255}" if family == 4 else f"fd00:c7::{peer:x}"
    dst = "10.213.0.2" if family == 4 else "fd00:c7::2"
    iph = _ip4(src, dst, 20 + len(tcp) + payload) if family == 4 else _ip6(src, dst, len(tcp) + payload)
    if have_ct:
        r.orig, r.reply = _tuple(src, 40000, dst, 20000, family), _tuple(dst, 20000, src, 40000, family)
    ctypes.memmove(r.iph, iph[:40], min(40, len(iph)))
    ctypes.memmove(r.tcph, tcp, len(tcp))
    r.tcph_len = len(tcp)
    r.data_off = r.nh_off = 64
    r.th_off = 64 + len(iph)
    r.skb_len = len(iph) + len(tcp) + payload
    return bytes(r)


def mix(peers: int = 64) -> list[bytes]:
    sack = b"\x01\x01" + bytes([5, 10]) + struct.pack("!II", 5000, 5000 + (1 << 30))
    out = []
    for p in range(1, peers + 1):
        out += [
            record(source=d.SRC_TCP_LOG_DEFERRED, log_type=2, value=70000, peer=p),
            record(source=d.SRC_TCP_LOG_VARIADIC, fmt=b"ACK is over upper bound %u (ACKed data not seen yet)",
                   args=(80000,), value=80000, ret=1, tcp=_tcp(40000, 20000, 1000, 5000, 0x10, 501, sack), peer=p),
            record(source=d.SRC_CT_LOG, fmt=b"%s",
                   string=b"SEQ is over the upper bound (over the window of the receiver)", family=6, peer=p),
            record(source=d.SRC_CT_LOG, fmt=b"packet (index %d) in dir %d invalid, state %s", args=(1, 0),
                   string=b"ESTABLISHED", tcp=_tcp(40000, 20000, 1000, 5000, 0x12, 501), payload=0, peer=p),
            record(source=d.SRC_L4_LOG, fmt=b"%s", string=b"invalid tcp flag combination", have_ct=False,
                   tcp=_tcp(1024, 80, p, 0, 0x03, 1024), payload=0, peer=p),
        ]
    return out


def _rate(fn, records, seconds: float) -> dict:
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    cpu0 = time.process_time()
    while True:
        for raw in records:
            fn(raw)
        n += len(records)
        now = time.perf_counter()
        if now >= deadline:
            break
    wall, cpu = now - t0, time.process_time() - cpu0
    return {"events": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "events_per_s": round(n / wall), "events_per_cpu_s": round(n / cpu) if cpu else None,
            "us_per_event": round(1e6 * cpu / n, 2) if n else None}


def run(seconds: float = 2.0) -> dict:
    records = mix()
    sink = open(os.devnull, "w")
    # sanity: every record decodes to the reason it was built for
    reasons = sorted({d.decode_record(r).reason for r in records})
    stages = {
        "parse": lambda raw: d.parse_record(raw),
        "decode": lambda raw: d.decode_record(raw),
        "json": lambda raw: sink.write(dumps(d.decode_record(raw).to_dict()) + "\n"),
        "table": lambda raw: sink.write(render.trace_line(d.decode_record(raw)) + "\n"),
    }
    out = {"machine": {"python": platform.python_version(), "cpu": _cpu_model(), "cores": os.cpu_count(),
                       "loadavg": os.getloadavg()},
           "records": len(records), "reasons": reasons, "stages": {}}
    for name, fn in stages.items():
        _rate(fn, records[:50], 0.2)               # warm-up
        out["stages"][name] = _rate(fn, records, seconds)
    sink.close()
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="decodebench")
    p.add_argument("--seconds", type=float, default=2.0, help="per stage")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.seconds)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"decode path, one core ({res['machine']['cpu']}, load {res['machine']['loadavg'][0]:.2f}); "
          f"{res['records']} records, reasons {', '.join(res['reasons'])}")
    for name, st in res["stages"].items():
        print(f"  {name:7} {st['events_per_cpu_s']:>9,} events/s per core  ({st['us_per_event']} us/event)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
