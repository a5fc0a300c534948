"""Address pseudonyms for files that leave the host.

Every IPv4/IPv6 address becomes a pseudonym that is consistent within one run (same
address, same pseudonym) and unlinkable across runs (keyed by a random secret that is never
written).  IPv4 pseudonyms live in 240.0.0.0/4 and IPv6 ones in fd00::/8 so they cannot be
mistaken for real hosts.  With keep_prefix=N, addresses sharing their first N bits share a
pseudonymous prefix, so "/24 groupings" survive without revealing the real /24.

Structured fields are mapped directly; all other text (kernel messages, ruleset lines,
report.md) goes through scrub(), which finds addresses by pattern.  Hostnames are dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from typing import Optional

_V4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
# candidate IPv6: hex groups with at least two colons; validated with ipaddress
_V6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|"
                    r"(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")
HOST_KEYS = ("hostname", "nodename", "fqdn")

V4_NET = ipaddress.ip_network("240.0.0.0/4")
V6_NET = ipaddress.ip_network("fd00::/8")


class Anonymizer:
    def __init__(self, keep_prefix: Optional[int] = None, key: Optional[bytes] = None):
        self.key = key if key is not None else os.urandom(32)
        self.keep_prefix = keep_prefix
        self.mapping: dict = {}      # original text -> pseudonym text
        self.issued: set = set()     # pseudonyms handed out (never re-mapped)
        self._prefixes: dict = {}

    # -- one address --
    def _h(self, data: str, bits: int, salt: int = 0) -> int:
        digest = hmac.new(self.key, f"{salt}|{data}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest, "big") % (1 << bits)

    def _pseudo(self, ip) -> str:
        if ip.version == 4:
            net, host_bits = V4_NET, 28          # 240/4 leaves 28 bits to fill
        else:
            net, host_bits = V6_NET, 120
        total = ip.max_prefixlen
        keep = min(self.keep_prefix or 0, total)
        for salt in range(1000):
            if keep:
                # the original prefix's pseudonym decides the top bits of the 28/120 free bits
                prefix_bits = min(keep, host_bits - 1)
                pfx = int(ip) >> (total - keep)
                top = self._prefixes.setdefault((ip.version, pfx, salt // 50),
                                                self._h(f"p{ip.version}:{pfx}", prefix_bits, salt // 50))
                low_bits = host_bits - prefix_bits
                low = self._h(str(ip), low_bits, salt)
                value = (top << low_bits) | low
            else:
                value = self._h(str(ip), host_bits, salt)
            cand = ipaddress.ip_address(int(net.network_address) + value)
            text = str(cand)
            if text not in self.issued and text not in self.mapping:
                return text
        raise RuntimeError("could not find a free pseudonym")   # not reachable in practice

    def address(self, text: str) -> str:
        """Pseudonym for one address string; non-addresses and '' come back unchanged."""
        if not text or text in self.issued:
            return text
        got = self.mapping.get(text)
        if got is not None:
            return got
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return text
        canon = str(ip)
        if canon in self.mapping:
            self.mapping[text] = self.mapping[canon]
            return self.mapping[canon]
        pseudo = self._pseudo(ip)
        self.mapping[canon] = self.mapping[text] = pseudo
        self.issued.add(pseudo)
        return pseudo

    # -- free text --
    def scrub(self, text: str) -> str:
        if not text:
            return text

        def replacer(kind):
            # The regexes over-match (e.g. "12:34" or "1.2.3.999"): only real addresses change.
            def repl(m):
                s = m.group(0)
                try:
                    kind(s)
                except ValueError:
                    return s
                return self.address(s)
            return repl

        text = _V6_RE.sub(replacer(ipaddress.IPv6Address), text)
        return _V4_RE.sub(replacer(ipaddress.IPv4Address), text)

    # -- whole records --
    def value(self, v):
        if isinstance(v, str):
            return self.scrub(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items() if k not in HOST_KEYS}
        return v

    def record(self, d: dict) -> dict:
        """Any NDJSON/report dict: addresses replaced everywhere, hostnames dropped."""
        return self.value(d)

    def event(self, ev):
        """An Event with every address replaced (a new object; the original is untouched)."""
        from .events import Event
        return Event.from_dict(self.record(ev.to_dict()))

    def cidr(self, text: str) -> str:
        """'203.0.113.0/24' -> pseudonym network of the same length (for --peer filters)."""
        net = ipaddress.ip_network(text, strict=False)
        return f"{self.address(str(net.network_address))}/{net.prefixlen}"
