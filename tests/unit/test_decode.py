"""decode: hand-built raw BPF records for each kernel era -> Events, messages, bounds."""
from __future__ import annotations

import ctypes
import socket
import struct
from pathlib import Path

import pytest

from conntrace import decode as d
from conntrace.events import REASONS, VERDICTS, WINDOW_REASONS, WindowSide

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "conntrace.h"

# ---- building records ------------------------------------------------------------------


def ipv4_header(src: str, dst: str, total_len: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total_len, 0, 0, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))


def ipv6_header(src: str, dst: str, payload_len: int) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, 6, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))


def tcp_header(sport, dport, seq, ack, flags, win, options=b"") -> bytes:
    options += b"\x01" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, win, 0, 0) + options


def sack_option(*blocks) -> bytes:
    body = b"".join(struct.pack("!II", l, r) for l, r in blocks)
    return b"\x01\x01" + bytes([5, 2 + len(body)]) + body


def tuple_bytes(src, sport, dst, dport, family=4) -> d.CtTuple:
    t = d.CtTuple()
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s, dd = socket.inet_pton(af, src), socket.inet_pton(af, dst)
    ctypes.memmove(t.src, s, len(s))
    ctypes.memmove(t.dst, dd, len(dd))
    t.sport = struct.unpack("=H", struct.pack("!H", sport))[0]
    t.dport = struct.unpack("=H", struct.pack("!H", dport))[0]
    t.l3num = 2 if family == 4 else 10
    t.protonum = 6
    return t


SENDER = dict(td_end=1000, td_maxend=70000, td_maxwin=64000, td_maxack=5000, td_scale=7, flags=0x03)
RECEIVER = dict(td_end=5000, td_maxend=80000, td_maxwin=65000, td_maxack=1000, td_scale=7, flags=0x03)


def make_record(*, source, fmt=b"", string=b"", args=(), value=None, ret=0, log_type=0, flags_extra=0,
                tcp: bytes | None = None, family=4, payload=0, dir_=0, state=3,
                sender=SENDER, receiver=RECEIVER, status=0b1110, netns=4026532234,
                ts_ns=5_000_000_000) -> bytes:
    r = d.CtEvent()
    r.ts_ns = ts_ns
    r.source = source
    r.netns = netns
    r.dir = dir_
    r.ct_status = status
    r.flags = d.F_HAVE_CT | d.F_HAVE_PKT | d.F_HAVE_TCPH | d.F_HAVE_KNOBS | flags_extra
    if value is not None:
        r.value = value
        r.flags |= d.F_HAVE_VALUE
    r.ret = ret
    r.log_type = log_type
    for i, a in enumerate(args):
        r.args[i] = a
    r.fmt = fmt
    r.str = string
    seen = [sender, receiver] if dir_ == 0 else [receiver, sender]
    for i, s in enumerate(seen):
        for k, v in s.items():
            setattr(r.tcp.seen[i], k, v)
    r.tcp.state = state
    tcp = tcp if tcp is not None else tcp_header(40000, 20000, 1000, 5000, 0x10, 501)
    if family == 4:
        iph = ipv4_header("10.0.0.1", "10.0.0.2", 20 + len(tcp) + payload)
        r.orig = tuple_bytes("10.0.0.1", 40000, "10.0.0.2", 20000)
        r.reply = tuple_bytes("10.0.0.2", 20000, "10.0.0.1", 40000)
    else:
        iph = ipv6_header("fd00::1", "fd00::2", len(tcp) + payload)
        r.orig = tuple_bytes("fd00::1", 40000, "fd00::2", 20000, 6)
        r.reply = tuple_bytes("fd00::2", 20000, "fd00::1", 40000, 6)
    ctypes.memmove(r.iph, iph[:40], min(40, len(iph)))
    ctypes.memmove(r.tcph, tcp, len(tcp))
    r.tcph_len = 60
    r.data_off = r.nh_off = 64
    r.th_off = 64 + len(iph) if family == 4 else 64 + 40
    r.skb_len = (len(iph) if family == 4 else 40) + len(tcp) + payload
    return bytes(r)


# ---- layout ----------------------------------------------------------------------------

def test_header_and_python_agree():
    d.check_header(HEADER)
    c = d.header_constants(HEADER)
    assert c["CT_EVENT_SIZE"] == ctypes.sizeof(d.CtEvent) == 456
    assert c["CT_AGG_KEY_SIZE"] == ctypes.sizeof(d.CtAggKey) == 44


def test_header_mismatch_is_reported(tmp_path):
    bad = tmp_path / "conntrace.h"
    bad.write_text(HEADER.read_text().replace("#define CT_R_SACK_OVER 3", "#define CT_R_SACK_OVER 9"))
    with pytest.raises(ValueError, match="CT_R_SACK_OVER"):
        d.check_header(bad)


def test_reason_and_verdict_names_match_events():
    assert set(d.REASON_CODES) == set(REASONS)
    assert d.VERDICT_CODES == list(VERDICTS)
    assert set(d.REASON_CODES[1:7]) == WINDOW_REASONS   # CT_R_SEQ_OVER..CT_R_LAST_WINDOW


def test_short_record_rejected():
    with pytest.raises(ValueError):
        d.parse_record(b"\0" * 100)


# ---- classification of every kernel string -----------------------------------------------

@pytest.mark.parametrize("ks", d.KERNEL_STRINGS, ids=lambda ks: ks.text[:30])
def test_every_kernel_string_classifies(ks):
    if ks.str_arg is None and "%" not in ks.text and ks.reason in WINDOW_REASONS | {"UNKNOWN", "SHORT_PACKET",
                                                                                      "TRUNCATED", "BAD_CHECKSUM",
                                                                                      "BAD_FLAGS", "INVALID_NEW"}:
        assert d.classify_text("%s", ks.text) == (ks.reason, ks.verdict)   # logged as ("%s", text)
    assert d.classify_text(ks.text) == (ks.reason, ks.verdict)


def test_kernel_strings_by_era():
    c = d.classify_text
    # pre-6.1 window reasons: all INVALID
    assert c("%s", "SEQ is under the lower bound (already ACKed data retransmitted)") == ("SEQ_UNDER", "invalid")
    assert c("%s", "ACK is under the lower bound (possible overly delayed ACK)") == ("ACK_UNDER", "invalid")
    # 6.1+: under-bound reasons are IGNOREd
    assert c("SEQ is under lower bound %u (already ACKed data retransmitted)") == ("SEQ_UNDER", "ignored")
    assert c("ignored ACK under lower bound %u (possible overly delayed)") == ("ACK_UNDER", "ignored")
    assert c("invalid packet ignored in state %s ") == ("IGNORED_STATE", "ignored")
    assert c("invalid state") == ("INVALID_STATE", "invalid")
    assert c("packet (index %d) in dir %d invalid, state %s") == ("INVALID_STATE", "invalid")
    assert c("packet (index %d) in dir %d ignored, state %s") == ("IGNORED_STATE", "ignored")
    assert c("packet (index %d, dir %d) response for index %d lower timeout to %u") == ("LOWER_TIMEOUT", "info")
    assert c("challenge-ack ignored") == ("CHALLENGE_ACK", "info")
    assert c("%s", "invalid new") == ("INVALID_NEW", "invalid")
    assert c("%s", "short packet") == ("SHORT_PACKET", "invalid")
    # unseen wording still lands by meaning; garbage is UNKNOWN
    assert c("lowered timeout to CLOSE")[0] == "LOWER_TIMEOUT"
    assert c("something new entirely") == ("UNKNOWN", "invalid")


def test_fmt_keys_are_unique_and_padded():
    keys = [k for k, *_ in d.fmt_table_entries()]
    assert len(keys) == len(set(keys)) == len(d.KERNEL_STRINGS)
    assert all(len(k) == d.KEY_LEN and k[-1] == 0 for k in keys)
    assert d.fmt_key("packet (index %d) in dir %d ignored, state %s") != \
        d.fmt_key("packet (index %d) in dir %d invalid, state %s")
    entry = dict((k, (r, v, s)) for k, r, v, s in d.fmt_table_entries())
    assert entry[d.fmt_key("packet (index %d) in dir %d invalid, state %s")] == \
        (d.REASON_CODE["INVALID_STATE"], d.VERDICT_CODE["invalid"], 2)


# ---- message rendering -----------------------------------------------------------------

def test_render_u32_ignores_junk_upper_half_of_slot():
    assert d.render_message("SEQ is over upper bound %u (over the window of the receiver)",
                            [0xDEADBEEF_BBBB_BBBB]) == \
        "SEQ is over upper bound 3149642683 (over the window of the receiver)"


def test_render_state_machine_and_lower_timeout():
    assert d.render_message("packet (index %d) in dir %d invalid, state %s", [1, 0, 0xffff8880], "ESTABLISHED") == \
        "packet (index 1) in dir 0 invalid, state ESTABLISHED"
    assert d.render_message("packet (index %d, dir %d) response for index %d lower timeout to %u",
                            [2, 1, 4, 30000]) == "packet (index 2, dir 1) response for index 4 lower timeout to 30000"
    assert d.render_message("%d", [0xFFFFFFFF]) == "-1"
    assert d.render_message("100%% %s", [0], None) == "100% ?"
    assert d.render_message("invalid packet ignored in state %s ", [0], "SYN_SENT") == \
        "invalid packet ignored in state SYN_SENT "


# ---- sequence arithmetic -------------------------------------------------------------------

def test_signed_32bit_before_after():
    assert d.s32(0xFFFFFFFF) == -1 and d.s32(0x80000000) == -(1 << 31) and d.s32(5) == 5
    assert d.after(5, 0xFFFFFFF0)          # wrapped: 5 comes after 2^32-16
    assert d.before(0xFFFFFFF0, 5)
    assert not d.after(0xFFFFFFF0, 5)
    assert d.highest_sack(100, [50, 300, 0xFFFFFF00]) == 300


def test_recompute_bounds_each_window_reason():
    snd = WindowSide(**SENDER)
    rcv = WindowSide(**RECEIVER)
    # SEQ over: seq had to be < td_maxend + 1
    assert d.recompute_bound("SEQ_OVER", snd, rcv, 70001 + 99, 5000, [], 0x18, 10) == (70001, 100)
    # ACK over: the ACK had to be < receiver.td_end + 1
    assert d.recompute_bound("ACK_OVER", snd, rcv, 1000, 5000 + 10, [], 0x10, 0) == (5001, 10)
    # SACK over: receiver has SACK_PERM, edge beyond td_end
    assert d.recompute_bound("SACK_OVER", snd, rcv, 1000, 4000, [5100], 0x10, 0) == (5001, 100)
    # SEQ under: end had to be > td_end - receiver.td_maxwin - 1 (wraps below zero)
    b, dist = d.recompute_bound("SEQ_UNDER", snd, rcv, 0xFFFF0000, 5000, [], 0x18, 100)
    assert b == (1000 - 65000 - 1) & 0xFFFFFFFF and dist == d.s32(b - (0xFFFF0000 + 100)) + 1
    assert dist > 0
    # ACK under: bound uses max(sender.td_maxwin, 66000)
    b, dist = d.recompute_bound("ACK_UNDER", snd, rcv, 1000, 5000 - 70000, [], 0x10, 0)
    assert b == (5000 - 66000 - 1) & 0xFFFFFFFF and dist == 4000   # sack 70000 back, bound 66001 back
    # overshot: the kernel's "bytes more than expected" = end - td_maxend + 1
    assert d.recompute_bound("OVERSHOT", snd, rcv, 70001, 5000, [], 0x18, 200) == (70001, 70001 + 200 - 70000 + 1)
    assert d.recompute_bound("INVALID_RST", snd, rcv, 1, 1, [], 0x04, 0) == (None, None)


def test_no_ack_flag_uses_receiver_td_end():
    snd, rcv = WindowSide(**SENDER), WindowSide(**RECEIVER)
    seq, end, sack = d.kernel_numbers(snd, rcv, 1000, 0xDEAD, [], 0x02, 0)   # bare SYN
    assert sack == rcv.td_end and end == 1001


def test_parse_tcp_options():
    seg = d.parse_tcp(tcp_header(1, 2, 3, 4, 0x10, 5, sack_option((10, 20), (30, 40)) + b"\x03\x03\x07"))
    assert seg.sack_edges == [20, 40] and seg.wscale == 7 and seg.doff == 11
    assert d.parse_tcp(b"\0" * 10) is None
    assert d.flags_str(0x12) == "SA" and d.flags_str(0x18) == "PA" and d.flags_str(0x04) == "R"


# ---- whole records, per era ----------------------------------------------------------------

def test_deferred_seq_over():
    tcp = tcp_header(40000, 20000, 70001 + 1_000_000, 5000, 0x18, 501)
    raw = make_record(source=d.SRC_TCP_LOG_DEFERRED, log_type=2, value=70001, tcp=tcp, payload=100)
    ev = d.decode_record(raw, clock_offset=1_700_000_000.0)
    assert (ev.reason, ev.verdict) == ("SEQ_OVER", "invalid")
    assert ev.message == "SEQ is over upper bound 70001 (over the window of the receiver)"
    assert ev.bound == ev.bound_recomputed == 70001
    assert ev.distance == 1_000_001
    assert ev.time == pytest.approx(1_700_000_005.0)
    assert (ev.saddr, ev.sport, ev.daddr, ev.dport, ev.family) == ("10.0.0.1", 40000, "10.0.0.2", 20000, 4)
    assert ev.payload == 100 and ev.flags == "PA" and ev.win == 501 and ev.win_scaled == 501 << 7
    assert ev.dir == "original" and ev.ct_state == "ESTABLISHED"
    assert ev.ct_status == ["SEEN_REPLY", "ASSURED", "CONFIRMED"]
    assert ev.orig.src == "10.0.0.1" and ev.reply.sport == 20000
    assert ev.seen[0].td_maxend == 70000 and ev.seen[1].td_end == 5000
    assert ev.source == "kprobe:nf_tcp_log_invalid (deferred)"
    ev.to_dict()  # serialisable


@pytest.mark.parametrize("log_type,reason,verdict", [(1, "OVERSHOT", "ignored"), (3, "ACK_OVER", "invalid"),
                                                     (4, "SEQ_UNDER", "ignored"), (5, "ACK_UNDER", "ignored")])
def test_deferred_types(log_type, reason, verdict):
    ev = d.decode_record(make_record(source=d.SRC_TCP_LOG_DEFERRED, log_type=log_type, value=1234,
                                     tcp=tcp_header(40000, 20000, 1000, 0x7000_0000, 0x10, 501)))
    assert (ev.reason, ev.verdict) == (reason, verdict)
    assert "1234" in ev.message
    if reason == "OVERSHOT":
        assert ev.distance == 1234 and ev.bound == SENDER["td_maxend"] + 1
    else:
        assert ev.bound == 1234


def test_deferred_ack_over_by_sack_edge_is_sack_over():
    tcp = tcp_header(40000, 20000, 1000, 4990, 0x10, 501, sack_option((5100, 5200)))
    ev = d.decode_record(make_record(source=d.SRC_TCP_LOG_DEFERRED, log_type=3, value=5001, tcp=tcp))
    assert ev.reason == "SACK_OVER" and ev.sack == 5200 and ev.ack == 4990
    assert ev.bound == 5001 and ev.distance == 200
    assert ev.message == "ACK is over upper bound 5001 (ACKed data not seen yet)"


def test_variadic_liberal_and_ret():
    fmt = b"SEQ is over upper bound %u (over the window of the receiver)"
    tcp = tcp_header(40000, 20000, 80000, 5000, 0x18, 501)
    base = dict(source=d.SRC_TCP_LOG_VARIADIC, fmt=fmt, args=[70001 | (0xAAAA << 32)], value=70001, tcp=tcp,
                payload=10)
    ev = d.decode_record(make_record(ret=1, **base))
    assert (ev.reason, ev.verdict, ev.bound, ev.distance) == ("SEQ_OVER", "invalid", 70001, 10000)
    assert ev.message == "SEQ is over upper bound 70001 (over the window of the receiver)"
    assert ev.source == "kprobe:nf_tcp_log_invalid (variadic)"
    ev = d.decode_record(make_record(ret=1, flags_extra=d.F_LIBERAL_SYSCTL, **base))
    assert ev.verdict == "accepted-liberal"
    ev = d.decode_record(make_record(ret=0, flags_extra=d.F_LIBERAL_SENDER,
                                     **{**base, "fmt": b"%u bytes more than expected", "args": [5]}))
    assert (ev.reason, ev.verdict, ev.distance) == ("OVERSHOT", "accepted-liberal", 70001)
    ev = d.decode_record(make_record(ret=0, **{**base, "fmt": b"ignored ACK under lower bound %u (possible overly delayed)"}))
    assert (ev.reason, ev.verdict) == ("ACK_UNDER", "ignored")


def test_pre61_window_reason_bound_is_recomputed():
    tcp = tcp_header(40000, 20000, 1000, 5000 + 777, 0x10, 501)
    raw = make_record(source=d.SRC_CT_LOG, fmt=b"%s", string=b"ACK is over the upper bound (ACKed data not seen yet)",
                      args=[0xffffffffc0de0000], tcp=tcp)
    ev = d.decode_record(raw)
    assert (ev.reason, ev.verdict) == ("ACK_OVER", "invalid")
    assert ev.message == "ACK is over the upper bound (ACKed data not seen yet)"
    assert ev.bound == ev.bound_recomputed == 5001 and ev.distance == 777
    assert ev.source == "kprobe:nf_ct_l4proto_log_invalid"


def test_pre61_seq_under_is_invalid_with_recomputed_bound():
    tcp = tcp_header(40000, 20000, (1000 - 200000) & 0xFFFFFFFF, 5000, 0x18, 501)
    ev = d.decode_record(make_record(source=d.SRC_CT_LOG, fmt=b"%s", payload=100, tcp=tcp,
                                     string=b"SEQ is under the lower bound (already ACKed data retransmitted)"))
    assert (ev.reason, ev.verdict) == ("SEQ_UNDER", "invalid")
    assert ev.bound == (1000 - 65000 - 1) & 0xFFFFFFFF
    assert ev.distance == 200000 - 100 - 65000 - 1 + 1


def test_pre61_overshot_uses_the_kernels_number():
    ev = d.decode_record(make_record(source=d.SRC_CT_LOG, fmt=b"%u bytes more than expected", args=[321],
                                     tcp=tcp_header(40000, 20000, 70001, 5000, 0x18, 501), payload=320))
    assert (ev.reason, ev.verdict, ev.distance, ev.message) == ("OVERSHOT", "invalid", 321, "321 bytes more than expected")


def test_state_machine_reply_direction():
    tcp = tcp_header(20000, 40000, 5000, 1000, 0x12, 501)
    ev = d.decode_record(make_record(source=d.SRC_CT_LOG, fmt=b"packet (index %d) in dir %d ignored, state %s",
                                     args=[1, 1, 0], string=b"ESTABLISHED", dir_=1, tcp=tcp))
    assert (ev.reason, ev.verdict) == ("IGNORED_STATE", "ignored")
    assert ev.message == "packet (index 1) in dir 1 ignored, state ESTABLISHED"
    assert ev.dir == "reply" and ev.flags == "SA" and ev.win_scaled == 0   # SYN: unscaled
    assert ev.bound is None and ev.distance is None
    # the sender of a reply segment is seen[1]
    assert ev.seen[1].td_maxend == SENDER["td_maxend"]


def test_state_name_falls_back_to_ct_state_when_string_unread():
    ev = d.decode_record(make_record(source=d.SRC_CT_LOG, fmt=b"packet (index %d) in dir %d invalid, state %s",
                                     args=[1, 0, 0], state=3))
    assert ev.message == "packet (index 1) in dir 0 invalid, state ESTABLISHED"


def test_tcp_error_ipv6():
    ev = d.decode_record(make_record(source=d.SRC_L4_LOG, fmt=b"%s", string=b"bad checksum", family=6,
                                     tcp=tcp_header(40000, 20000, 1, 2, 0x18, 9), payload=10))
    assert (ev.reason, ev.verdict, ev.message) == ("BAD_CHECKSUM", "invalid", "bad checksum")
    assert (ev.family, ev.saddr, ev.daddr, ev.payload) == (6, "fd00::1", "fd00::2", 10)
    assert ev.orig.src == "fd00::1"


def test_record_without_packet_uses_tuple():
    r = d.CtEvent.from_buffer_copy(make_record(source=d.SRC_CT_LOG, fmt=b"invalid rst", dir_=1))
    r.flags &= ~(d.F_HAVE_PKT | d.F_HAVE_TCPH)
    ev = d.decode_record(r)
    assert (ev.reason, ev.saddr, ev.sport, ev.daddr) == ("INVALID_RST", "10.0.0.2", 20000, "10.0.0.1")
    assert d.record_knobs(r)["ignore_invalid_rst"] == 0


def test_aggregate_row():
    k, v = d.CtAggKey(), d.CtAggVal()
    k.netns, k.family = 7, 4
    k.reason, k.verdict = d.REASON_CODE["SACK_OVER"], d.VERDICT_CODE["invalid"]
    ctypes.memmove(k.peer, socket.inet_aton("192.0.2.9"), 4)
    ctypes.memmove(k.local, socket.inet_aton("10.0.0.2"), 4)
    k.lport = struct.unpack("=H", struct.pack("!H", 443))[0]
    v.packets, v.bytes, v.first_ns, v.last_ns = 3, 180, 1_000_000_000, 3_000_000_000
    row = d.decode_aggregate(k, v, clock_offset=100.0)
    assert (row.peer, row.local, row.local_port, row.reason, row.verdict) == \
        ("192.0.2.9", "10.0.0.2", 443, "SACK_OVER", "invalid")
    assert (row.packets, row.bytes, row.first_seen, row.last_seen, row.peer_port) == (3, 180, 101.0, 103.0, None)


def test_510_ignored_state_message_has_no_trailing_blank():
    ev = d.decode_record(make_record(source=d.SRC_CT_LOG, fmt=b"invalid packet ignored in state %s ",
                                     args=[0xffffffff81000000], string=b"ESTABLISHED"))
    assert (ev.reason, ev.verdict) == ("IGNORED_STATE", "ignored")
    assert ev.message == "invalid packet ignored in state ESTABLISHED"


# ---- Probe's user-space side against fake BPF tables (no kernel needed) -----------------------

class _Cell:
    def __init__(self, value):
        self.value = value


class _Table:
    """items()/keys() over (key, value) pairs, like a BCC hash table."""
    def __init__(self, pairs):
        self.pairs = pairs

    def items(self):
        return list(self.pairs)

    def keys(self):
        return [k for k, _ in self.pairs]


class _FakeBpf:
    def __init__(self, aggs, inserted, failed, lost_per_cpu, knobs):
        self.tables = {"aggs": _Table(aggs), "agg_stats": [_Cell(inserted), _Cell(failed)],
                       "lost": [lost_per_cpu], "netns_knobs": _Table(knobs)}
        self.cleaned = 0

    def __getitem__(self, name):
        return self.tables[name]

    def ring_buffer_poll(self, timeout):
        pass

    def ring_buffer_consume(self):
        pass

    def cleanup(self):
        self.cleaned += 1


def test_probe_reads_aggregates_overflow_lost_and_knobs():
    from conntrace.probe import Probe, AttachPlan
    k, v = d.CtAggKey(), d.CtAggVal()
    k.family, k.netns, k.reason, k.verdict = 4, 9, d.REASON_CODE["SEQ_OVER"], 0
    ctypes.memmove(k.peer, socket.inet_aton("10.213.0.101"), 4)
    v.packets, v.bytes = 50000, 7_000_000
    knob = type("K", (), {"be_liberal": 1, "loose": 1, "ignore_invalid_rst": 255, "log_invalid": 0, "checksum": 1})()
    fake = _FakeBpf([(k, v)], inserted=4100, failed=2, lost_per_cpu=[3, 4], knobs=[(_Cell(9), knob)])
    p = Probe(AttachPlan("deferred", [], [], {}), aggregate=True)
    p._bpf = fake
    rows = p.read_aggregates()
    assert [(r.peer, r.reason, r.packets) for r in rows] == [("10.213.0.101", "SEQ_OVER", 50000)]
    assert p.aggregate_overflow() == 4100 - 1 + 2        # evicted (inserted - present) + failed
    assert p.lost_events() == 7
    assert p.netns_knobs() == {9: {"be_liberal": 1, "loose": 1, "ignore_invalid_rst": None,
                                   "log_invalid": 0, "checksum": 1}}
    # a ring-buffer record goes through the callback into poll()
    raw = make_record(source=d.SRC_TCP_LOG_DEFERRED, log_type=2, value=70001,
                      tcp=tcp_header(40000, 20000, 80000, 5000, 0x18, 501))
    buf = ctypes.create_string_buffer(raw)
    p._on_event(None, ctypes.addressof(buf), len(raw))
    p._on_event(None, ctypes.addressof(buf), 10)           # truncated: counted, not raised
    evs = p.poll(0)
    assert [e.reason for e in evs] == ["SEQ_OVER"] and p.decode_errors == 1 and p.poll(0) == []
    assert p.netns_knobs()[4026532234]["log_invalid"] == 0
    p.close()
    p.close()
    assert fake.cleaned == 1
