"""Hand-built Ethernet/IPv4/IPv6/TCP frames for the conntrack lab.

Why this exists: to make conntrack mark a segment INVALID we must send segments that no
well-behaved TCP stack would send (sequence numbers far outside the window, SACK blocks
beyond the data sent, SYN+FIN, bad checksums, a data offset longer than the header).
scapy is not available in the lab guests, so this module builds and parses the few header
layouts we need with the standard library only, and opens AF_PACKET sockets inside a
network namespace to inject and sniff them.

Everything except `PacketSocket` is pure (no I/O) and unit-tested in tests/unit/test_packets.py.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6

# TCP flag bits (byte 13 of the header)
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
FLAG_NAMES = ((CWR, "CWR"), (ECE, "ECE"), (URG, "URG"), (ACK, "ACK"),
              (PSH, "PSH"), (RST, "RST"), (SYN, "SYN"), (FIN, "FIN"))

# TCP option kinds
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TIMESTAMP = 0, 1, 2, 3, 4, 5, 8

# AF_PACKET sll_pkttype values seen by recvfrom()
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = 0, 1, 2, 3, 4


def flags_to_str(flags: int) -> str:
    """'SYN|ACK' style name for a flag byte (kernel nf_log prints them space separated)."""
    names = [name for bit, name in reversed(FLAG_NAMES) if flags & bit]
    return "|".join(names) if names else "NONE"


def flags_from_str(text: str) -> int:
    """Inverse of flags_to_str; accepts '|', ',', '+' or spaces as separators."""
    by_name = {name: bit for bit, name in FLAG_NAMES}
    value = 0
    for part in text.replace(",", "|").replace("+", "|").replace(" ", "|").split("|"):
        part = part.strip().upper()
        if part and part != "NONE":
            value |= by_name[part]
    return value


# ---------------------------------------------------------------------------------------------
# Checksums

def ones_complement_sum(data: bytes) -> int:
    """16-bit one's complement sum of `data` (odd length padded with a zero byte), folded.

    Uses the identity 2**16 == 1 (mod 0xFFFF): the big-endian integer of the data is congruent
    to the sum of its 16-bit words, so one C-level big-int operation replaces a Python loop.
    That matters for the middlebox forwarder, which checksums every segment it rewrites.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    if not data:
        return 0
    value = int.from_bytes(data, "big") % 0xFFFF
    if value == 0 and any(data):
        return 0xFFFF          # a non-zero sum that folds to "negative zero"
    return value


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum (the value to store in the header field)."""
    return (~ones_complement_sum(data)) & 0xFFFF


def pseudo_header(src: str, dst: str, length: int, proto: int = IPPROTO_TCP) -> bytes:
    """IPv4 (RFC 793) or IPv6 (RFC 8200 §8.1) pseudo header for the L4 checksum."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        return s.packed + d.packed + struct.pack("!BBH", 0, proto, length)
    return s.packed + d.packed + struct.pack("!IxxxB", length, proto)


def tcp_checksum(src: str, dst: str, segment: bytes) -> int:
    """Checksum of a TCP segment whose checksum field (bytes 16-17) is zero."""
    return internet_checksum(pseudo_header(src, dst, len(segment)) + segment)


# ---------------------------------------------------------------------------------------------
# TCP options

def opt_nop() -> bytes:
    return bytes([OPT_NOP])


def opt_mss(mss: int) -> bytes:
    return struct.pack("!BBH", OPT_MSS, 4, mss)


def opt_wscale(shift: int) -> bytes:
    return struct.pack("!BBB", OPT_WSCALE, 3, shift)


def opt_sack_perm() -> bytes:
    return struct.pack("!BB", OPT_SACK_PERM, 2)


def opt_sack(blocks: list[tuple[int, int]]) -> bytes:
    """SACK option: up to 4 (left, right) blocks, right edge exclusive, modulo 2**32."""
    if not 1 <= len(blocks) <= 4:
        raise ValueError("a SACK option carries 1 to 4 blocks")
    body = b"".join(struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF) for left, right in blocks)
    return struct.pack("!BB", OPT_SACK, 2 + len(body)) + body


def opt_timestamps(tsval: int, tsecr: int) -> bytes:
    return struct.pack("!BBII", OPT_TIMESTAMP, 10, tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)


def build_options(*options: bytes) -> bytes:
    """Concatenate encoded options and pad with EOL to a multiple of 4 bytes (max 40)."""
    raw = b"".join(options)
    raw += b"\0" * (-len(raw) % 4)
    if len(raw) > 40:
        raise ValueError(f"TCP options are {len(raw)} bytes, the header allows 40")
    return raw


def parse_options(raw: bytes) -> dict:
    """Decode TCP options into {'mss', 'wscale', 'sack_perm', 'sack': [(l, r)], 'ts': (val, ecr)}.

    Tolerates garbage the way the kernel does: stops at EOL or at a length that runs past the end.
    """
    out: dict = {}
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(raw):
            break
        length = raw[i + 1]
        if length < 2 or i + length > len(raw):
            break
        body = raw[i + 2:i + length]
        if kind == OPT_MSS and length == 4:
            out["mss"] = struct.unpack("!H", body)[0]
        elif kind == OPT_WSCALE and length == 3:
            out["wscale"] = body[0]
        elif kind == OPT_SACK_PERM and length == 2:
            out["sack_perm"] = True
        elif kind == OPT_SACK and (length - 2) % 8 == 0:
            out["sack"] = [struct.unpack("!II", body[j:j + 8]) for j in range(0, len(body), 8)]
        elif kind == OPT_TIMESTAMP and length == 10:
            out["ts"] = struct.unpack("!II", body)
        i += length
    return out


# ---------------------------------------------------------------------------------------------
# Headers

def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int, window: int = 65535,
               options: bytes = b"", urg: int = 0, doff_words: Optional[int] = None) -> bytes:
    """TCP header with a zero checksum. `doff_words` overrides the data offset (truncation tests)."""
    if len(options) % 4:
        options = build_options(options)
    doff = doff_words if doff_words is not None else (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       (doff & 0xF) << 4, flags & 0xFF, window & 0xFFFF, 0, urg) + options


def ipv4_header(src: str, dst: str, payload_len: int, proto: int = IPPROTO_TCP, ttl: int = 64,
                ident: int = 0, dont_fragment: bool = True, tos: int = 0) -> bytes:
    """20-byte IPv4 header with a correct header checksum."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + payload_len, ident & 0xFFFF,
                      0x4000 if dont_fragment else 0, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr[:10] + struct.pack("!H", internet_checksum(hdr)) + hdr[12:]


def ipv6_header(src: str, dst: str, payload_len: int, next_header: int = IPPROTO_TCP,
                hop_limit: int = 64, flow_label: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (flow_label & 0xFFFFF), payload_len, next_header,
                       hop_limit, ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ethernet_frame(dst_mac: str, src_mac: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


@dataclass
class Segment:
    """A TCP segment to inject; the numbers are exactly what goes on the wire."""
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int = 0
    flags: int = ACK
    window: int = 1024
    options: bytes = b""
    payload: bytes = b""
    bad_checksum: bool = False          # store a checksum that is off by one
    truncate_to_header: bool = False    # declare doff=15 (60 bytes) but send only 20 bytes

    @property
    def family(self) -> str:
        return "ipv6" if ":" in self.src else "ipv4"

    def tcp_bytes(self) -> bytes:
        if self.truncate_to_header:
            # The header claims 60 bytes; what follows the first 20 is simply not there.
            hdr = tcp_header(self.sport, self.dport, self.seq, self.ack, self.flags, self.window,
                             b"", doff_words=15)
            segment = hdr
        else:
            segment = tcp_header(self.sport, self.dport, self.seq, self.ack, self.flags,
                                 self.window, build_options(self.options) if self.options else b"") + self.payload
        csum = tcp_checksum(self.src, self.dst, segment)
        if self.bad_checksum:
            csum = (csum + 1) & 0xFFFF or 1
        return segment[:16] + struct.pack("!H", csum) + segment[18:]

    def ip_bytes(self) -> bytes:
        tcp = self.tcp_bytes()
        if self.family == "ipv4":
            return ipv4_header(self.src, self.dst, len(tcp)) + tcp
        return ipv6_header(self.src, self.dst, len(tcp)) + tcp

    def frame(self, dst_mac: str, src_mac: str) -> bytes:
        ethertype = ETH_P_IP if self.family == "ipv4" else ETH_P_IPV6
        return ethernet_frame(dst_mac, src_mac, ethertype, self.ip_bytes())

    def describe(self) -> dict:
        """The numbers a scenario records for the segment it injected."""
        opts = parse_options(build_options(self.options)) if self.options else {}
        sack = opts.get("sack")
        return {
            "src": self.src, "dst": self.dst, "sport": self.sport, "dport": self.dport,
            "seq": self.seq & 0xFFFFFFFF, "ack": self.ack & 0xFFFFFFFF,
            "flags": flags_to_str(self.flags), "flags_value": self.flags,
            "window": self.window, "payload_len": len(self.payload),
            "sack_blocks": [list(b) for b in sack] if sack else None,
            "sack_right_edge": max((b[1] for b in sack), default=None) if sack else None,
            "bad_checksum": self.bad_checksum, "truncated": self.truncate_to_header,
        }


# ---------------------------------------------------------------------------------------------
# Parsing (sniffer and middlebox)

@dataclass
class ParsedTCP:
    family: str
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    doff: int
    payload_len: int
    options: dict = field(default_factory=dict)
    ip_offset: int = 14        # where the IP header starts in the frame
    tcp_offset: int = 34       # where the TCP header starts in the frame

    @property
    def seg_len(self) -> int:
        """Sequence space used: payload plus one for SYN and for FIN."""
        return self.payload_len + bool(self.flags & SYN) + bool(self.flags & FIN)


def parse_frame(frame: bytes) -> Optional[ParsedTCP]:
    """Parse an Ethernet frame carrying IPv4/IPv6 + TCP; None for anything else.

    The payload length comes from the IP length fields, not from the frame size, so GSO
    super-frames and Ethernet padding are both handled.
    """
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_IP and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != IPPROTO_TCP:
            return None
        total = struct.unpack_from("!H", frame, 16)[0]
        src = socket.inet_ntop(socket.AF_INET, frame[26:30])
        dst = socket.inet_ntop(socket.AF_INET, frame[30:34])
        tcp_off = 14 + ihl
        l4_len = (total - ihl) if total else (len(frame) - tcp_off)
        family = "ipv4"
    elif ethertype == ETH_P_IPV6 and len(frame) >= 54:
        if frame[20] != IPPROTO_TCP:     # extension headers: not used in the lab
            return None
        l4_len = struct.unpack_from("!H", frame, 18)[0] or (len(frame) - 54)
        src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
        dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
        tcp_off = 54
        family = "ipv6"
    else:
        return None
    if len(frame) < tcp_off + 20:
        return None
    sport, dport, seq, ack, doff_byte, flags, window = struct.unpack_from("!HHIIBBH", frame, tcp_off)
    doff = (doff_byte >> 4) * 4
    opts = parse_options(frame[tcp_off + 20:tcp_off + doff]) if doff > 20 else {}
    return ParsedTCP(family, src, dst, sport, dport, seq, ack, flags, window, doff,
                     max(0, l4_len - doff), opts, 14, tcp_off)


def seq_after(a: int, b: int) -> bool:
    """The kernel's after(a, b): a is later than b in 32-bit sequence space."""
    return ((b - a) & 0xFFFFFFFF) >= 0x80000000 and a != b


def seq_max(a: int, b: int) -> int:
    return a if seq_after(a, b) else b


# ---------------------------------------------------------------------------------------------
# AF_PACKET sockets inside a namespace

class PacketSocket:
    """An AF_PACKET socket bound to `ifname` inside netns `ns` (None: the current netns).

    Used to inject hand-built frames (send) and to sniff a veth (recv). The socket keeps its
    namespace after creation, so the calling thread returns to its own netns immediately.
    """

    def __init__(self, ns: Optional[str], ifname: str, proto: int = ETH_P_ALL, rcvbuf: int = 4 << 20):
        from . import netlab           # local import: keeps the pure helpers import-light
        with netlab.netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
            self.sock.bind((ifname, proto))
        self.ifname = ifname

    def send(self, frame: bytes) -> int:
        return self.sock.send(frame)

    def recv(self, timeout: Optional[float] = None, bufsize: int = 65536):
        """One (frame, pkttype) or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            data, addr = self.sock.recvfrom(bufsize)
        except (socket.timeout, BlockingIOError):
            return None
        return data, addr[2]

    def drain(self, quiet: float = 0.0) -> list:
        """All queued (frame, pkttype); waits up to `quiet` s after the last one for more."""
        out = []
        while True:
            got = self.recv(timeout=quiet if quiet > 0 else 0.0)
            if got is None:
                return out
            out.append(got)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
