"""Conntrack knobs and counters, per network namespace.

/proc/sys/net/... shows the namespace of the *thread* that opens it, so reading or writing
another namespace's sysctl means entering it.  We do that in a short-lived thread
(setns(2) only moves the calling thread), leaving the rest of conntrace where it was.
/proc/<pid>/net/stat/nf_conntrack needs no entering: it is the stat of <pid>'s namespace.

Reading never writes; apply_sysctl() is the only writer in conntrace and is called only by
`conntrace advise --apply`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, Optional

NETFILTER = "/proc/sys/net/netfilter"
KNOBS = ("nf_conntrack_tcp_be_liberal", "nf_conntrack_tcp_loose",
         "nf_conntrack_tcp_ignore_invalid_rst", "nf_conntrack_log_invalid",
         "nf_conntrack_checksum", "nf_conntrack_max", "nf_conntrack_count")
# knobs `advise --apply` may change, and only to these values
APPLICABLE = {"nf_conntrack_tcp_be_liberal": (0, 1), "nf_conntrack_tcp_ignore_invalid_rst": (0, 1),
              "nf_conntrack_checksum": (0, 1), "nf_conntrack_tcp_loose": (0, 1)}
STAT_FIELDS = ("invalid", "ignore", "drop", "insert_failed", "early_drop", "found", "new",
               "entries")
CLONE_NEWNET = 0x40000000


class SysctlError(Exception):
    """One-line message for the user."""


@dataclass
class NetnsRef:
    """A namespace we can enter: a path to an nsfs file plus how to name it in commands."""
    path: str
    inode: int
    name: Optional[str] = None     # /var/run/netns name
    pid: Optional[int] = None      # a process living in it
    is_self: bool = False          # the namespace conntrace runs in

    def label(self) -> str:
        if self.name:
            return self.name
        if self.pid:
            return f"pid {self.pid}"
        return f"{self.inode}"

    def exec_prefix(self) -> str:
        """What to put in front of a command so it runs in this namespace."""
        if self.is_self:
            return ""
        if self.name:
            return f"ip netns exec {shlex.quote(self.name)} "
        return f"nsenter --net={shlex.quote(self.path)} "


def own_netns_inode() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def resolve_netns(spec: str) -> NetnsRef:
    """NAME (ip netns), PID, or PATH to an nsfs file -> NetnsRef. SysctlError when unusable."""
    spec = spec.strip()
    if not spec:
        raise SysctlError("empty --netns")
    name = pid = None
    if spec.isdigit():
        pid = int(spec)
        path = f"/proc/{pid}/ns/net"
    elif "/" in spec:
        path = spec
    else:
        name = spec
        path = f"/var/run/netns/{spec}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = (f"no process {pid}" if pid is not None else
                f"no network namespace named {name!r} (see `ip netns list`)" if name else
                f"{path} does not exist")
        raise SysctlError(f"--netns {spec}: {what}") from None
    except PermissionError:
        raise SysctlError(f"--netns {spec}: cannot read {path}: permission denied (run as root)") \
            from None
    own = own_netns_inode()
    return NetnsRef(path=path, inode=st.st_ino, name=name, pid=pid, is_self=(st.st_ino == own))


def netns_map(proc: str = "/proc", run_netns: str = "/var/run/netns") -> dict:
    """inode -> {"names": [...], "pids": [...]} for every namespace we can see."""
    out: dict = {}
    try:
        for name in sorted(os.listdir(run_netns)):
            try:
                ino = os.stat(os.path.join(run_netns, name)).st_ino
            except OSError:
                continue
            out.setdefault(ino, {"names": [], "pids": []})["names"].append(name)
    except OSError:
        pass
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    for p in sorted(pids, key=int):
        try:
            ino = os.stat(f"{proc}/{p}/ns/net").st_ino
        except OSError:
            continue
        entry = out.setdefault(ino, {"names": [], "pids": []})
        if len(entry["pids"]) < 5:       # a few are enough to enter it and to recognise it
            entry["pids"].append(int(p))
    return out


def ref_for_inode(inode: int, nsmap: dict) -> Optional[NetnsRef]:
    entry = nsmap.get(inode)
    if not entry:
        return None
    own = own_netns_inode()
    if entry["names"]:
        return NetnsRef(path=f"/var/run/netns/{entry['names'][0]}", inode=inode,
                        name=entry["names"][0], pid=(entry["pids"] or [None])[0],
                        is_self=(inode == own))
    if entry["pids"]:
        pid = entry["pids"][0]
        return NetnsRef(path=f"/proc/{pid}/ns/net", inode=inode, pid=pid, is_self=(inode == own))
    return None


# ---- entering a namespace -------------------------------------------------------------

def _setns(fd: int):
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(ref: Optional[NetnsRef], fn: Callable):
    """Run fn() with the calling thread inside ref's namespace; ref None/self runs it here."""
    if ref is None or ref.is_self:
        return fn()
    result: dict = {}

    def worker():
        try:
            fd = os.open(ref.path, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:       # handed back to the caller's thread
            result["error"] = e

    t = threading.Thread(target=worker, name=f"netns-{ref.inode}")
    t.start()
    t.join()
    if "error" in result:
        e = result["error"]
        if isinstance(e, OSError) and e.errno in (errno.EPERM, errno.EACCES):
            raise SysctlError(f"cannot enter netns {ref.label()}: permission denied (run as root)")
        if isinstance(e, OSError):
            raise SysctlError(f"cannot enter netns {ref.label()}: {e.strerror or e}")
        raise e
    return result.get("value")


# ---- reading --------------------------------------------------------------------------

def _read_knobs(base: str) -> dict:
    values: dict = {}
    for knob in KNOBS:
        try:
            with open(os.path.join(base, knob)) as fh:
                values[knob] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            values[knob] = None        # module not loaded, knob absent on this kernel, or no access
    return values


def read_sysctls(ref: Optional[NetnsRef] = None, base: str = NETFILTER) -> dict:
    """knob -> int or None (absent) for one namespace."""
    return in_netns(ref, lambda: _read_knobs(base))


def read_all_sysctls(inodes, nsmap: Optional[dict] = None) -> dict:
    """inode -> knobs for each namespace in inodes we can enter; unknown ones map to {}."""
    nsmap = netns_map() if nsmap is None else nsmap
    own = own_netns_inode()
    out = {}
    for ino in sorted(set(inodes)):
        if ino == own:
            out[ino] = read_sysctls(None)
            continue
        ref = ref_for_inode(ino, nsmap)
        if ref is None:
            out[ino] = {}
            continue
        try:
            out[ino] = read_sysctls(ref)
        except SysctlError:
            out[ino] = {}
    return out


def parse_conntrack_stat(text: str) -> dict:
    """/proc/net/stat/nf_conntrack: a header, then one line of hex counters per CPU -> sums.

    `entries` is the same global number on every line, so it is taken once, not summed.
    """
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    header = lines[0]
    sums = {h: 0 for h in header}
    seen_entries = False
    for cols in lines[1:]:
        for h, v in zip(header, cols):
            try:
                n = int(v, 16)
            except ValueError:
                continue
            if h == "entries":
                if not seen_entries:
                    sums[h] = n
                continue
            sums[h] += n
        seen_entries = True
    return sums


def read_conntrack_stat(pid: Optional[int] = None, path: Optional[str] = None) -> Optional[dict]:
    path = path or (f"/proc/{pid}/net/stat/nf_conntrack" if pid else "/proc/net/stat/nf_conntrack")
    try:
        with open(path) as fh:
            return parse_conntrack_stat(fh.read())
    except OSError:
        return None


def read_conntrack_stat_of(inode: int, nsmap: dict) -> Optional[dict]:
    """The stat of any namespace: via a process in it, else by entering it (ip netns names).

    After setns the thread must read /proc/thread-self/net: /proc/self/net follows the
    main thread's namespace.
    """
    if inode == own_netns_inode():
        return read_conntrack_stat()
    entry = nsmap.get(inode) or {}
    for pid in entry.get("pids") or []:
        got = read_conntrack_stat(pid)
        if got is not None:
            return got
    ref = ref_for_inode(inode, nsmap)
    if ref is None:
        return None
    try:
        return in_netns(ref, lambda: read_conntrack_stat(
            path="/proc/thread-self/net/stat/nf_conntrack"))
    except SysctlError:
        return None


def stat_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    if not before or not after:
        return None
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "entries"}


# ---- writing (advise --apply only) ----------------------------------------------------

def full_name(knob: str) -> str:
    return f"net.netfilter.{knob}"


def sysctl_command(ref: Optional[NetnsRef], knob: str, value: int) -> str:
    prefix = ref.exec_prefix() if ref else ""
    return f"{prefix}sysctl -w {full_name(knob)}={value}"


def apply_sysctl(ref: NetnsRef, knob: str, value: int, base: str = NETFILTER):
    """Write knob=value in ref's namespace. Returns (previous, undo command)."""
    if knob not in APPLICABLE or value not in APPLICABLE[knob]:
        raise SysctlError(f"refusing to set {knob}={value}: not a remedy conntrace applies")
    path = os.path.join(base, knob)

    def write():
        try:
            with open(path) as fh:
                previous = int(fh.read().split()[0])
        except FileNotFoundError:
            raise SysctlError(f"{full_name(knob)} does not exist in netns {ref.label()}: "
                              f"nf_conntrack not loaded there, or this kernel lacks the knob") \
                from None
        except PermissionError:
            raise SysctlError(f"cannot read {full_name(knob)}: permission denied (run as root)") \
                from None
        try:
            with open(path, "w") as fh:
                fh.write(f"{value}\n")
        except PermissionError:
            raise SysctlError(f"cannot write {full_name(knob)}: permission denied (run as root)") \
                from None
        except OSError as e:
            raise SysctlError(f"cannot write {full_name(knob)}: {e.strerror or e}") from None
        return previous

    previous = in_netns(ref, write)
    return previous, sysctl_command(ref, knob, previous)


def run_tool(argv: list, ref: Optional[NetnsRef] = None, timeout: float = 10.0):
    """Run a read-only tool (iptables-save, nft list) in a namespace -> (ok, output or why)."""
    def run():
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            return False, f"{argv[0]} not found"
        except subprocess.TimeoutExpired:
            return False, f"{argv[0]} timed out"
        except OSError as e:
            return False, f"{argv[0]}: {e.strerror or e}"
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[0]
            return False, f"{' '.join(argv)}: {err}"
        return True, p.stdout
    try:
        return in_netns(ref, run)
    except SysctlError as e:
        return False, str(e)
