"""Network namespaces, veths and the conntrack oracle for the lab scenarios.

Why this exists: every scenario needs the same scaffolding -- throw-away namespaces joined by
veth pairs, a stateful nft firewall that makes conntrack track the server's netns, the sysctls
that make the kernel log its own reason for an INVALID verdict, and three independent
"oracles" read before and after each injected segment: the kernel's `nf_ct_proto_6:` log
lines, the per-netns conntrack statistics (invalid/ignore/drop) and the nft drop counter.

Speed matters: scenarios also run in QEMU/TCG guests ~20x slower than native, so namespace
switching, statistics, counters and the kernel log are read in-process (setns, /proc,
netlink, /dev/kmsg); subprocesses are used only for setup (ip, nft).

Every object created is named `ctl-<run id>-...` and removed by `NetLab.close()`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import socket
import struct
import subprocess
import time
from typing import Iterable, Optional

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):                      # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:       # Python 3.11
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: Optional[str]):
    """Run the body with the calling *thread* inside netns `name` (None: stay where we are).

    Sockets, /proc/thread-self/net, /proc/sys/net and forked children all follow the thread's
    netns, so this replaces `ip netns exec` without its fork/exec and sysfs remount cost.
    """
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def run(cmd: list[str], ns: Optional[str] = None, input: Optional[str] = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside netns `ns` (forked from a thread that entered it)."""
    with netns(ns):
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (netns {ns}) failed with {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# ---------------------------------------------------------------------------------------------
# Kernel modules and sysctls

LAB_MODULES = ("nf_conntrack", "nf_conntrack_ipv4", "nf_conntrack_ipv6", "nf_defrag_ipv6",
               "nf_log_syslog", "nf_log_ipv4", "nf_log_ipv6", "veth", "nf_tables", "nft_ct", "nft_objref",
               "nft_counter", "nft_chain_nat", "nf_nat")


def load_modules(names: Iterable[str] = LAB_MODULES) -> dict:
    """modprobe the modules; built-in or absent (renamed across kernels) is not an error.

    One `modprobe -a` for all of them (each exec costs ~0.5 s in a TCG guest). Returns
    {name: "loaded" | "present" | "not-loadable"} for the record; "not-loadable" also covers
    built-ins that have no /sys/module entry.
    """
    names = list(names)
    before = {n: os.path.isdir(f"/sys/module/{n}") for n in names}
    try:
        subprocess.run(["modprobe", "-a", "-q", *names], capture_output=True, text=True)
    except FileNotFoundError:
        pass
    status = {}
    for name in names:
        if os.path.isdir(f"/sys/module/{name}"):
            status[name] = "present" if before[name] else "loaded"
        else:
            status[name] = "not-loadable"
    return status


def sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str, ns: Optional[str] = None) -> Optional[str]:
    with netns(ns):
        try:
            with open(sysctl_path(key)) as f:
                return f.read().strip()
        except OSError:
            return None


def write_sysctl(key: str, value, ns: Optional[str] = None, required: bool = True) -> bool:
    """Write a (per-netns) sysctl from inside `ns`; the netns is bound at open() time."""
    with netns(ns):
        try:
            with open(sysctl_path(key), "w") as f:
                f.write(f"{value}\n")
            return True
        except OSError as exc:
            if required:
                raise RuntimeError(f"sysctl {key}={value} in netns {ns}: {exc}") from exc
            return False


# ---------------------------------------------------------------------------------------------
# Conntrack statistics (/proc/net/stat/nf_conntrack of one netns)

def read_ct_stats(ns: Optional[str]) -> dict:
    """Per-netns conntrack counters summed over CPUs, e.g. {'invalid': 3, 'ignore': 0, 'drop': 0}.

    The file is hex, one line per CPU, with a header naming the columns (the column set
    differs between kernels, so we go by name). `conntrack -S` prints the same numbers.
    """
    with netns(ns):
        with open("/proc/thread-self/net/stat/nf_conntrack") as f:
            lines = f.read().split("\n")
    header = lines[0].split()
    totals = dict.fromkeys(header, 0)
    for line in lines[1:]:
        cols = line.split()
        if len(cols) != len(header):
            continue
        for name, val in zip(header, cols):
            totals[name] += int(val, 16)
    totals.pop("entries", None)      # a gauge, identical on every line: not a counter
    return totals


def stats_delta(before: dict, after: dict, keys=("invalid", "ignore", "drop", "insert_failed", "error")) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if k in after or k in before}


# ---------------------------------------------------------------------------------------------
# nftables: the stateful firewall and its drop counter

FW_TABLE = "ctl_fw"
FW_COUNTER = "invalid_drops"


def firewall_ruleset(table: str = FW_TABLE, counter: str = FW_COUNTER) -> str:
    """Accept established/related, count and drop invalid; the rest passes (policy accept).

    A rule using `ct` is what makes conntrack register its hooks in this netns at all.
    The forward chain covers a server netns that routes.
    """
    return f"""
table inet {table} {{
    counter {counter} {{ }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        ct state invalid counter name "{counter}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        ct state invalid counter name "{counter}" drop
    }}
}}
"""


def install_firewall(ns: str) -> None:
    run(["nft", "-f", "-"], ns=ns, input=firewall_ruleset())


# netlink constants for the in-process counter read
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETOBJ = 19
_NFPROTO_INET = 1
_NFT_OBJECT_COUNTER = 1
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NFTA_OBJ_TABLE, _NFTA_OBJ_NAME, _NFTA_OBJ_TYPE, _NFTA_OBJ_DATA = 1, 2, 3, 4
_NFTA_COUNTER_BYTES, _NFTA_COUNTER_PACKETS = 1, 2


def _nlattr(kind: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def _parse_nlattrs(data: bytes) -> dict:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, i)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + length]
        i += (length + 3) & ~3
    return out


class NftCounter:
    """Reads one named nft counter via nfnetlink (fast), falling back to `nft -j` (slow)."""

    def __init__(self, ns: str, table: str = FW_TABLE, name: str = FW_COUNTER):
        self.ns, self.table, self.name = ns, table, name
        self.seq = 0
        try:
            with netns(ns):
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
            self.sock.settimeout(2.0)
        except OSError:
            self.sock = None

    def _netlink_read(self) -> int:
        self.seq += 1
        body = struct.pack("=BBH", _NFPROTO_INET, 0, 0)
        body += _nlattr(_NFTA_OBJ_TABLE, self.table.encode() + b"\0")
        body += _nlattr(_NFTA_OBJ_NAME, self.name.encode() + b"\0")
        body += _nlattr(_NFTA_OBJ_TYPE, struct.pack("!I", _NFT_OBJECT_COUNTER))
        msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETOBJ
        msg = struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST, self.seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            i = 0
            while i + 16 <= len(data):
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, i)
                payload = data[i + 16:i + length]
                i += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if mtype == _NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    raise OSError(-code, f"nft getobj: {os.strerror(-code)}")
                attrs = _parse_nlattrs(payload[4:])          # skip struct nfgenmsg
                data_attrs = _parse_nlattrs(attrs.get(_NFTA_OBJ_DATA, b""))
                return struct.unpack("!Q", data_attrs[_NFTA_COUNTER_PACKETS])[0]

    def _nft_read(self) -> int:
        proc = run(["nft", "-j", "list", "counter", "inet", self.table, self.name], ns=self.ns)
        for item in json.loads(proc.stdout).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise RuntimeError("nft -j list counter: no counter in output")

    def packets(self) -> int:
        if self.sock is not None:
            try:
                return self._netlink_read()
            except (OSError, KeyError, struct.error):
                self.sock.close()
                self.sock = None
        return self._nft_read()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# The kernel log

# "nf_ct_proto_6: <message> IN=... OUT=... SRC=... DST=... ... SPT=... DPT=..."
_PREFIX_RE = re.compile(r"nf_ct_proto_(?P<proto>\d+):\s?(?P<rest>.*)$")
_FIELD_START_RE = re.compile(r"(?:^|\s)(?=IN=)")
_FIELD_RE = re.compile(r"\b([A-Z][A-Z0-9]*)=(\S*)")
_TCP_FLAG_WORDS = ("CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN")

# Kernel message -> stable reason code (conntrace.events.REASONS), all eras.
_REASON_PATTERNS = (
    ("OVERSHOT", re.compile(r"^(?P<bound>\d+) bytes more than expected")),
    ("SEQ_OVER", re.compile(r"^SEQ is over (?:the )?upper bound(?: (?P<bound>\d+))?")),
    ("ACK_OVER", re.compile(r"^ACK is over (?:the )?upper bound(?: (?P<bound>\d+))?")),
    ("SEQ_UNDER", re.compile(r"^SEQ is under (?:the )?lower bound(?: (?P<bound>\d+))?")),
    ("ACK_UNDER", re.compile(r"^(?:ignored )?ACK (?:is )?under (?:the )?lower bound(?: (?P<bound>\d+))?")),
    ("INVALID_RST", re.compile(r"^invalid rst")),
    ("INVALID_STATE", re.compile(r"^packet \(index (?P<index>\d+)\) in dir (?P<dir>\d+) invalid, state (?P<state>\w+)")),
    ("INVALID_STATE", re.compile(r"^invalid state")),
    ("IGNORED_STATE", re.compile(r"^packet \(index (?P<index>\d+)\) in dir (?P<dir>\d+) ignored, state (?P<state>\w+)")),
    ("IGNORED_STATE", re.compile(r"^invalid packet ignored in state (?P<state>\w+)")),
    ("LOWER_TIMEOUT", re.compile(r"^packet \(index (?P<index>\d+), dir (?P<dir>\d+)\) response for index (?P<last_index>\d+) lower timeout to (?P<bound>\d+)")),
    ("LOWER_TIMEOUT", re.compile(r"^lowered timeout")),
    ("CHALLENGE_ACK", re.compile(r"^challenge-ack ignored")),
    ("BAD_CHECKSUM", re.compile(r"^bad checksum")),
    ("TRUNCATED", re.compile(r"^truncated packet")),
    ("SHORT_PACKET", re.compile(r"^short packet")),
    ("BAD_FLAGS", re.compile(r"^invalid tcp flag combination")),
    ("INVALID_NEW", re.compile(r"^invalid new")),
)


def classify_message(message: str) -> tuple[str, dict]:
    """(reason code, captured numbers/names) for a conntrack log message; UNKNOWN if new."""
    for code, pattern in _REASON_PATTERNS:
        m = pattern.search(message)
        if m:
            groups = {k: (int(v) if v is not None and v.isdigit() else v)
                      for k, v in m.groupdict().items() if v is not None}
            return code, groups
    return "UNKNOWN", {}


def parse_log_line(line: str) -> Optional[dict]:
    """Parse one kernel log line containing `nf_ct_proto_N:`; None for any other line.

    Returns {'proto', 'message', 'reason', 'bound', 'fields': {IN, OUT, SRC, DST, SPT, DPT, ...},
    'tcp_flags': [...], 'src', 'dst', 'sport', 'dport', 'raw'}. Tolerant of a leading
    "[ 12.345]" timestamp, of a missing IN=... part, and of extra fields.
    """
    m = _PREFIX_RE.search(line)
    if not m:
        return None
    rest = m.group("rest")
    split = _FIELD_START_RE.search(rest)
    if split:
        message, tail = rest[:split.start()], rest[split.start():]
    else:
        message, tail = rest, ""
    message = message.strip()
    fields = dict(_FIELD_RE.findall(tail))
    # TCP flags are bare words after PROTO=TCP ("... WINDOW=64 RES=0x00 ACK PSH URGP=0")
    tcp_part = tail.split("PROTO=TCP", 1)[1] if "PROTO=TCP" in tail else ""
    tcp_flags = [w for w in tcp_part.split() if w in _TCP_FLAG_WORDS]
    reason, groups = classify_message(message)

    def num(key):
        value = fields.get(key)
        return int(value) if value is not None and value.isdigit() else None

    return {
        "proto": int(m.group("proto")),
        "message": message,
        "reason": reason,
        "bound": groups.get("bound"),
        "details": {k: v for k, v in groups.items() if k != "bound"},
        "fields": fields,
        "tcp_flags": tcp_flags,
        "src": fields.get("SRC"), "dst": fields.get("DST"),
        "sport": num("SPT"), "dport": num("DPT"),
        "in": fields.get("IN"), "out": fields.get("OUT"),
        "raw": line.rstrip("\n"),
    }


class KernelLog:
    """New kernel log records since a mark, from /dev/kmsg (fallback: `dmesg` line counting)."""

    def __init__(self):
        self.fd = None
        self._dmesg_seen = 0
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)        # start after everything already logged
        except OSError:
            self.fd = None
            self._dmesg_seen = len(self._dmesg_lines())

    @staticmethod
    def _dmesg_lines() -> list[str]:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True)
        return proc.stdout.splitlines()

    def read_new(self) -> list[dict]:
        """[{'seq', 'ts_us', 'text'}] for records logged since the previous call."""
        out = []
        if self.fd is None:
            lines = self._dmesg_lines()
            for text in lines[self._dmesg_seen:]:
                out.append({"seq": None, "ts_us": None, "text": text})
            self._dmesg_seen = len(lines)
            return out
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.EPIPE:        # ring buffer overran us: skip ahead
                    continue
                raise
            if not record:
                return out
            head, _, body = record.decode("utf-8", "replace").partition(";")
            parts = head.split(",")
            text = body.split("\n", 1)[0]        # continuation lines (" KEY=...") are metadata
            out.append({"seq": int(parts[1]) if len(parts) > 1 else None,
                        "ts_us": int(parts[2]) if len(parts) > 2 else None,
                        "text": text})

    def read_conntrack(self) -> list[dict]:
        """Only the new `nf_ct_proto_*` records, parsed."""
        out = []
        for rec in self.read_new():
            parsed = parse_log_line(rec["text"])
            if parsed is not None:
                parsed["kmsg_seq"] = rec["seq"]
                parsed["ts_us"] = rec["ts_us"]
                out.append(parsed)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# ethtool: offloads off, so a user-space forwarder sees MTU-sized frames with full checksums

_SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM, ETHTOOL_SSG, ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO = 0x17, 0x19, 0x1F, 0x24, 0x2C


def ethtool_set(ns: Optional[str], ifname: str, cmd: int, value: int) -> bool:
    """Legacy ethtool set-one-feature ioctl (no ethtool binary needed). False if refused."""
    import fcntl
    arg = ctypes.create_string_buffer(struct.pack("=II", cmd, value))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(arg)) + b"\0" * 16
    with netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def disable_offloads(ns: Optional[str], ifname: str) -> dict:
    """TSO/GSO/GRO/SG/TX-checksum off: every frame on the wire is what a real NIC would send."""
    return {name: ethtool_set(ns, ifname, cmd, 0) for name, cmd in
            (("tso", ETHTOOL_STSO), ("gso", ETHTOOL_SGSO), ("gro", ETHTOOL_SGRO),
             ("sg", ETHTOOL_SSG), ("tx-csum", ETHTOOL_STXCSUM))}


# ---------------------------------------------------------------------------------------------
# Topology

class NetLab:
    """Owner of the namespaces of one run; `close()` (or `with`) deletes them all.

    Names: netns `ctl-<id>-<role>`, interfaces `ctl<id><suffix>` (<=15 chars), where <id> is
    unique per run (pid + time), so concurrent runs and leftovers never clash.
    """

    def __init__(self, run_id: Optional[str] = None):
        self.run_id = run_id or f"{(os.getpid() ^ int(time.time() * 1000)) & 0xFFFF:04x}"
        self.namespaces: list[str] = []
        self._saved_init_sysctls: dict[str, str] = {}

    def ns_name(self, role: str) -> str:
        return f"ctl-{self.run_id}-{role}"

    def if_name(self, suffix: str) -> str:
        name = f"ctl{self.run_id}{suffix}"
        if len(name) > 15:
            raise ValueError(f"interface name {name} longer than 15 characters")
        return name

    def add_ns(self, role: str) -> str:
        name = self.ns_name(role)
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        # No DAD: IPv6 addresses are usable at once (DAD would add ~1-2 s per address).
        write_sysctl("net.ipv6.conf.all.accept_dad", 0, ns=name, required=False)
        write_sysctl("net.ipv6.conf.default.accept_dad", 0, ns=name, required=False)
        run(["ip", "link", "set", "lo", "up"], ns=name)
        return name

    def add_veth(self, ns_a: str, if_a: str, mac_a: str, ns_b: str, if_b: str, mac_b: str,
                 mtu: int = 1500) -> None:
        """A veth pair with fixed MACs, one end in each namespace, both up."""
        run(["ip", "link", "add", if_a, "address", mac_a, "mtu", str(mtu), "netns", ns_a,
             "type", "veth", "peer", "name", if_b, "address", mac_b, "mtu", str(mtu), "netns", ns_b])
        run(["ip", "link", "set", if_a, "up"], ns=ns_a)
        run(["ip", "link", "set", if_b, "up"], ns=ns_b)

    def ip_batch(self, ns: str, commands: list[str]) -> None:
        """Several `ip` commands in one process (ip -batch)."""
        run(["ip", "-batch", "-"], ns=ns, input="\n".join(commands) + "\n")

    def set_init_sysctl(self, key: str, value) -> None:
        """Set an init-netns sysctl, remembering the old value for close()."""
        old = read_sysctl(key)
        if old is not None and key not in self._saved_init_sysctls:
            self._saved_init_sysctls[key] = old
        write_sysctl(key, value, required=False)

    def enable_invalid_log(self, ns: str) -> None:
        """Make conntrack in `ns` log its INVALID/ignore reasons for TCP to the kernel log."""
        self.set_init_sysctl("net.netfilter.nf_log_all_netns", 1)
        write_sysctl("net.netfilter.nf_conntrack_log_invalid", 6, ns=ns)

    def close(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces.clear()
        # Another lab run (ours or a colleague's) still needs nf_log_all_netns: leave it set.
        try:
            others = [n for n in os.listdir(NETNS_DIR) if n.startswith("ctl-")]
        except FileNotFoundError:
            others = []
        if not others:
            for key, value in self._saved_init_sysctls.items():
                write_sysctl(key, value, required=False)
        self._saved_init_sysctls.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def kernel_release() -> str:
    return os.uname().release


def kernel_version(release: Optional[str] = None, proc_version: Optional[str] = None) -> tuple[int, int, int]:
    """(major, minor, patch) from a release string like '6.1.0-41-amd64' or '6.18.44-fc'.

    Debian's ABI name (6.1.0-41) hides the real patch level; /proc/version carries it
    ("Debian 6.1.176-1"), so we prefer that when reading the running kernel.
    """
    if release is None:
        release = kernel_release()
        try:
            with open("/proc/version") as f:
                proc_version = f.read()
        except OSError:
            pass
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    base = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    if proc_version:
        # "(gcc-10 (Debian 10.2.1-6) ...) #1 SMP Debian 5.10.262-1": the compiler is Debian too,
        # so take the Debian version whose major.minor is the running kernel's.
        for found in re.findall(r"Debian (\d+)\.(\d+)\.(\d+)", proc_version):
            version = tuple(int(x) for x in found)
            if version[:2] == base[:2]:
                return version
    return base
