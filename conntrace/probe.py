"""Attach-ladder detection, BCC loading, event polling and aggregate reading.

Interface (the front end codes against exactly this):

``plan_attach() -> AttachPlan``
    Picks the rung from /proc/kallsyms and BTF (/sys/kernel/btf/vmlinux and
    /sys/kernel/btf/nf_conntrack), never from ``uname -r``.  Raises ProbeError
    (one line) when conntrack is not loaded or the kernel cannot run kprobes.

``Probe(plan=None, *, aggregate=False, events=True, ringbuf_pages=256, backlog=65536, filters=None)``
    ``start()`` compiles bpf/conntrace.bpf.c once and attaches; ``poll(timeout_ms)``
    returns the Events decoded since the last poll (the ring buffer is drained into a
    backlog of raw records at once, decoding follows at Python speed); ``backlog_len()``
    says how many wait; ``discard_backlog()`` drops them as lost (at exit);
    ``lost_events()`` counts events dropped between kernel and user space (ring buffer
    full, backlog full, discarded), cumulative;
    ``read_aggregates()`` returns AggregateRow (aggregate=True); ``aggregate_overflow()``
    counts keys the LRU map evicted or failed to insert; ``netns_knobs()`` gives the
    be_liberal/loose/ignore_invalid_rst/log_invalid/checksum values each probe saw per
    netns; ``close()`` detaches (idempotent).  Also a context manager.

Every expected failure raises ProbeError whose message is one user-facing line.
"""
from __future__ import annotations

import collections
import ctypes
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import kernel
from .decode import (AggregateRow, CtAggKey, CtAggVal, EVENT_SIZE, check_header, decode_aggregate,
                     decode_record, fmt_table_entries, parse_record, record_knobs)
from .events import Event

__all__ = ["ProbeError", "AttachPlan", "ProbeFilters", "Probe", "AggregateRow", "plan_attach",
           "choose_rung", "bpf_dir"]


class ProbeError(Exception):
    """message is a one-line user-facing error (no traceback)"""


@dataclass
class AttachPlan:
    """What will be attached on this kernel and why.

    rung: "deferred", "variadic" or "pre-6.1".
    probes: e.g. ["kprobe:nf_tcp_log_invalid", "kprobe:nf_ct_l4proto_log_invalid", ...].
    missing: what could not be used, each with what the user misses because of it.
    abi: the facts behind the choice (helper_has_state, deferred_struct, evidence, ...).
    """
    rung: str
    probes: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    abi: dict = field(default_factory=dict)

    def cflags(self) -> list[str]:
        rung = {"pre-6.1": 1, "variadic": 2, "deferred": 3}[self.rung]
        return [f"-DCT_RUNG={rung}",
                f"-DCT_HELPER_STATE={1 if self.abi.get('helper_has_state', True) else 0}",
                f"-DCT_HAVE_IGNORE_INVALID_RST={1 if self.abi.get('ignore_invalid_rst') else 0}"]


@dataclass
class ProbeFilters:
    """In-kernel filters (cheap); peer CIDR / reason / verdict filtering stays in user space."""
    netns: Optional[int] = None     # network namespace inode
    port: Optional[int] = None      # TCP source or destination port of the rejected segment


HELPERS = ("nf_ct_l4proto_log_invalid", "nf_l4proto_log_invalid")
_INTERESTING = {"nf_tcp_log_invalid", "nf_conntrack_in", "nf_conntrack_tcp_packet", *HELPERS}


def bpf_dir() -> Path:
    """bpf/ next to the package (checkout), else the installed data files."""
    here = Path(__file__).resolve().parent.parent / "bpf"
    if (here / "conntrace.bpf.c").exists():
        return here
    for prefix in (sys.prefix, "/usr/local", "/usr"):
        p = Path(prefix) / "share" / "conntrace" / "bpf"
        if (p / "conntrace.bpf.c").exists():
            return p
    raise ProbeError("bpf/conntrace.bpf.c not found: reinstall conntrace")


def _helper_has_state(btf: Optional[kernel.Btf]) -> tuple[Optional[bool], str]:
    """5.14 added the nf_hook_state argument to both log helpers; find out which we have."""
    if btf is not None:
        fp = btf.func_proto("nf_ct_l4proto_log_invalid")
        if fp is not None:
            return fp.named >= 4, f"BTF: nf_ct_l4proto_log_invalid has {fp.named} named arguments"
        fp = btf.func_proto("nf_l4proto_log_invalid")
        if fp is not None:
            return fp.named == 4, f"BTF: nf_l4proto_log_invalid has {fp.named} named arguments"
    hdr = kernel.headers_dir()
    if hdr and os.path.isdir(hdr):
        for sub in ("include/net/netfilter/nf_conntrack_l4proto.h",):
            for root in (hdr, os.path.join(os.path.dirname(hdr), "source"), os.path.join(hdr, "..", "source")):
                p = Path(root, sub)
                if p.exists():
                    text = p.read_text(errors="replace")
                    i = text.find("void nf_ct_l4proto_log_invalid(")
                    if i >= 0:
                        proto = text[i:text.find(")", i)]
                        return "nf_hook_state" in proto, f"headers: {p}"
    if btf is not None:
        m = btf.members("nf_tcp_net")
        if m is not None:
            # the same release (5.14) added tcp_ignore_invalid_rst: a proxy, say so
            return "tcp_ignore_invalid_rst" in m, "guessed from struct nf_tcp_net (5.14 added both)"
    return None, "no BTF prototype and no headers"


def choose_rung(syms: dict, btf: Optional[kernel.Btf]) -> AttachPlan:
    """The ladder, from kallsyms names and BTF (pure: unit-tested with fake inputs).

    deferred: BTF has struct nf_tcp_invalid_log (6.1.184+, 6.12.104+, 7.2);
    variadic: nf_tcp_log_invalid exists without it (6.1.0-6.1.183 ... 7.1);
    pre-6.1:  no nf_tcp_log_invalid.
    """
    if "nf_conntrack_in" not in syms:
        raise ProbeError("nf_conntrack is not loaded (no nf_conntrack_in in /proc/kallsyms): "
                         "run `modprobe nf_conntrack` or add a conntrack rule first")
    probes, missing = [], []
    abi: dict = {"btf": btf.path if btf else None,
                 "conntrack_module": syms.get("nf_conntrack_in", "") or "built-in"}
    deferred = bool(btf and btf.has_struct("nf_tcp_invalid_log"))
    abi["deferred_struct"] = deferred
    has_tcp_log = "nf_tcp_log_invalid" in syms
    if has_tcp_log and deferred:
        rung = "deferred"
        abi["why"] = "BTF has struct nf_tcp_invalid_log and nf_tcp_log_invalid is out of line"
        probes.append("kprobe:nf_tcp_log_invalid")
        missing.append("be_liberal-accepted packets: deferred kernels never call nf_tcp_log_invalid "
                       "for them, so they are not reported")
    elif has_tcp_log:
        rung = "variadic"
        fp = btf.func_proto("nf_tcp_log_invalid") if btf else None
        if fp is None:
            abi["why"] = "nf_tcp_log_invalid in kallsyms; no BTF to confirm its prototype (assumed variadic)"
            missing.append("ABI unconfirmed: no BTF for nf_tcp_log_invalid; if this kernel has the "
                           "deferred struct log, window-reason numbers will be wrong")
        elif not fp.variadic:
            # A non-variadic nf_tcp_log_invalid without the struct in BTF: unknown ABI.
            raise ProbeError(f"unknown nf_tcp_log_invalid ABI ({fp.named} arguments, not variadic, "
                             "no struct nf_tcp_invalid_log in BTF): conntrace does not support this kernel yet")
        else:
            abi["why"] = f"nf_tcp_log_invalid is variadic in BTF ({fp.named} named arguments + ...)"
        probes.append("kprobe:nf_tcp_log_invalid")
    elif deferred:
        rung = "deferred"
        abi["why"] = "BTF has struct nf_tcp_invalid_log but nf_tcp_log_invalid is inlined"
        missing.append("window reasons (SEQ/ACK over/under, overshot): nf_tcp_log_invalid is inlined "
                       "in this build, so there is nothing to probe")
    else:
        rung = "pre-6.1"
        abi["why"] = "no nf_tcp_log_invalid in kallsyms: window reasons come as \"%s\" strings"
        missing.append("kernel's own bounds: pre-6.1 kernels print no numbers; bounds are recomputed "
                       "from the connection state")
        missing.append("be_liberal-accepted packets: pre-6.1 kernels skip logging for them")

    has_state, evidence = _helper_has_state(btf)
    if has_state is None:
        has_state = rung != "pre-6.1"
        evidence += f"; assumed {'5.14+' if has_state else '<=5.13'} signatures from the rung"
        missing.append("helper signature unconfirmed (no BTF, no headers): state-machine events may be garbled")
    abi["helper_has_state"] = has_state
    abi["helper_evidence"] = evidence
    members = btf.members("nf_tcp_net") if btf else None
    abi["ignore_invalid_rst"] = bool(members and "tcp_ignore_invalid_rst" in members)

    for fn, what in (("nf_ct_l4proto_log_invalid", "state-machine reasons (invalid rst, packet invalid/"
                      "ignored in state, challenge ack, lowered timeout)" +
                      (" and every window reason" if rung == "pre-6.1" else "")),
                     ("nf_l4proto_log_invalid", "tcp_error reasons (truncated, bad checksum, "
                      "bad flags, invalid new)")):
        if fn in syms:
            probes.append(f"kprobe:{fn}")
        else:
            missing.append(f"{what}: {fn} is not in kallsyms (CONFIG_SYSCTL=n or inlined)")
    if not probes:
        raise ProbeError("no conntrack logging function can be probed on this kernel")
    return AttachPlan(rung=rung, probes=probes, missing=missing, abi=abi)


def plan_attach(check_kprobes: bool = True) -> AttachPlan:
    """The attach plan for the running kernel; ProbeError (one line) when impossible."""
    try:
        syms = kernel.kallsyms(names=_INTERESTING)
    except OSError as e:
        raise ProbeError(f"cannot read /proc/kallsyms: {e.strerror}") from None
    try:
        btf = kernel.load_btf("nf_conntrack")
    except (OSError, kernel.BtfError) as e:
        btf = None
        btf_error = str(e)
    else:
        btf_error = None
    plan = choose_rung(syms, btf)
    if btf is None:
        plan.missing.append("no BTF (/sys/kernel/btf/vmlinux)" + (f": {btf_error}" if btf_error else "")
                            + ": the ABI is inferred from kallsyms and headers")
    if check_kprobes:
        ok, why = kernel.kprobes_available()
        if not ok:
            raise ProbeError(f"kprobes are unavailable on this kernel ({why}); conntrace needs "
                             "a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y")
        if kernel.lockdown() == "confidentiality":
            raise ProbeError("kernel lockdown is 'confidentiality': kprobes and BPF reads are refused "
                             "(boot with lockdown=integrity or none)")
    return plan


def _privileged() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                sys_admin, perfmon, bpf = 1 << 21, 1 << 38, 1 << 39
                return bool(caps & sys_admin) or (caps & perfmon and caps & bpf) == (perfmon | bpf)
    except OSError:
        pass
    return False


class Probe:
    """The BPF programs for one run.  See the module docstring for the interface."""

    def __init__(self, plan: AttachPlan | None = None, *, aggregate: bool = False, events: bool = True,
                 ringbuf_pages: int = 256, filters: "ProbeFilters|None" = None,
                 agg_entries: int = 16384, backlog: int = 65536):
        if not (aggregate or events):
            raise ProbeError("nothing to do: enable events or aggregate")
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ProbeError(f"ringbuf_pages must be a power of two, not {ringbuf_pages}")
        if backlog < 1:
            raise ProbeError(f"backlog must be at least 1 event, not {backlog}")
        self.plan = plan
        self.aggregate = aggregate
        self.events = events
        self.ringbuf_pages = ringbuf_pages
        self.filters = filters or ProbeFilters()
        self.agg_entries = agg_entries
        self._bpf = None
        self._pending: list[Event] = []
        # Raw records copied out of the ring buffer, not yet decoded (bounded: backlog).
        self.backlog = backlog
        self._raw: collections.deque[bytes] = collections.deque()
        self._user_lost = 0              # backlog full, or discarded at exit
        self._kernel_lost_at_close = 0
        self._knobs: dict[int, dict] = {}
        self._clock_offset = 0.0
        self.decode_errors = 0
        self._interrupted = False

    # -- lifecycle
    def cflags(self) -> list[str]:
        assert self.plan is not None
        f = self.filters
        for name, v, hi in (("netns", f.netns, 2**32 - 1), ("port", f.port, 65535)):
            if v is not None and not (0 < int(v) <= hi):
                raise ProbeError(f"bad {name} filter {v!r}: expected 1..{hi}")
        return self.plan.cflags() + [
            f"-DCT_EVENTS={1 if self.events else 0}",
            f"-DCT_AGG={1 if self.aggregate else 0}",
            f"-DCT_AGG_ENTRIES={int(self.agg_entries)}",
            f"-DCT_RINGBUF_PAGES={int(self.ringbuf_pages)}",
            f"-DCT_FILTER_NETNS={int(f.netns or 0)}",
            f"-DCT_FILTER_PORT={int(f.port or 0)}",
            f"-I{bpf_dir()}",
            "-Wno-unused-function",
        ]

    def start(self) -> None:
        """Compile once, attach; ProbeError with one line on any expected failure."""
        if self._bpf is not None:
            return
        if self.plan is None:
            self.plan = plan_attach()
        if not _privileged():
            raise ProbeError("conntrace trace needs root (or CAP_BPF + CAP_PERFMON): run it with sudo")
        from .bccfind import import_bcc, BccMissing
        try:
            bcc = import_bcc()
        except BccMissing as e:
            raise ProbeError(str(e)) from None
        if kernel.headers_dir() is None:
            raise ProbeError(f"kernel headers for {os.uname().release} are missing: "
                             f"apt install linux-headers-{os.uname().release}")
        src = bpf_dir() / "conntrace.bpf.c"
        try:
            check_header(bpf_dir() / "conntrace.h")
        except ValueError as e:
            raise ProbeError(str(e)) from None
        cflags = self.cflags()
        try:
            b = bcc.BPF(src_file=str(src).encode(), cflags=cflags)
        except Exception as e:  # BCC prints the compiler's errors itself
            raise ProbeError(f"BPF compile failed ({_one_line(e)}); compiler output is above") from None
        self._bpf = b
        try:
            attach = {"kprobe:nf_tcp_log_invalid": "on_tcp_log_invalid",
                      "kprobe:nf_ct_l4proto_log_invalid": "on_ct_log_invalid",
                      "kprobe:nf_l4proto_log_invalid": "on_l4_log_invalid"}
            attached = []
            for p in self.plan.probes:
                event = p.split(":", 1)[1]
                try:
                    b.attach_kprobe(event=event, fn_name=attach[p])
                    attached.append(p)
                except Exception as e:
                    if p == "kprobe:nf_tcp_log_invalid" or not attached and p == self.plan.probes[-1]:
                        raise ProbeError(f"cannot attach {p}: {_one_line(e)}") from None
                    self.plan.missing.append(f"{p} failed to attach ({_one_line(e)})")
            table = b["fmt_table"]
            for key, reason, verdict, str_arg in fmt_table_entries():
                k = table.Key()
                ctypes.memmove(ctypes.addressof(k), key, len(key))
                v = table.Leaf()
                v.reason, v.verdict, v.str_arg = reason, verdict, str_arg
                table[k] = v
            if self.events:
                b["events"].open_ring_buffer(self._on_event)
        except BaseException:
            self.close()
            raise
        self._clock_offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

    def close(self) -> None:
        """Detach everything; idempotent."""
        if self._bpf is not None:
            try:
                self._kernel_lost_at_close = self._kernel_lost()
            except Exception:
                pass
        b, self._bpf = self._bpf, None
        if b is not None:
            try:
                b.cleanup()
            except Exception:
                pass

    def __enter__(self) -> "Probe":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- events
    # The callback only copies: decoding costs tens of microseconds of Python per event,
    # and while a callback runs the kernel's ring buffer keeps filling. Copied records wait
    # in a bounded backlog, so a burst is delivered late rather than lost.
    _DECODE_SLICE = 64      # decode this many, then drain the kernel's ring again

    def _on_event(self, _ctx, data, size) -> None:
        try:
            if len(self._raw) >= self.backlog:
                self._user_lost += 1
                return
            self._raw.append(ctypes.string_at(data, min(size, EVENT_SIZE)))
        except KeyboardInterrupt:
            # Ctrl-C (or SIGTERM, which the CLI turns into it) landed inside this ctypes
            # callback, where ctypes would print and swallow it: carry it out of poll().
            self._interrupted = True

    def _drain_kernel(self, timeout_ms: int) -> None:
        if self._raw:
            self._bpf.ring_buffer_consume()          # decoding is behind: do not wait
        else:
            self._bpf.ring_buffer_poll(timeout_ms)
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    def _decode_one(self, raw: bytes) -> Optional[Event]:
        try:
            rec = parse_record(raw)
            ev = decode_record(rec, self._clock_offset)
        except Exception:
            self.decode_errors += 1
            return None
        knobs = record_knobs(rec)
        if knobs is not None:
            self._knobs[rec.netns] = knobs
        return ev

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Events decoded since the last poll: waits up to timeout_ms for the first, and
        spends about as long decoding a backlog.  A KeyboardInterrupt that arrives while
        it works is raised; nothing decoded or copied so far is lost by it."""
        if self._bpf is None:
            raise ProbeError("probe not started")
        out, self._pending = self._pending, []
        if not self.events:
            time.sleep(timeout_ms / 1000)
            return out
        try:
            self._drain_kernel(timeout_ms)
            deadline = time.monotonic() + timeout_ms / 1000
            while self._raw:
                for _ in range(min(self._DECODE_SLICE, len(self._raw))):
                    ev = self._decode_one(self._raw[0])
                    self._raw.popleft()
                    if ev is not None:
                        out.append(ev)
                if time.monotonic() >= deadline:
                    break
                self._drain_kernel(0)
        except KeyboardInterrupt:
            self._pending = out          # a caller that goes on gets them next
            raise
        return out

    def backlog_len(self) -> int:
        """Records copied from the kernel and not returned by poll() yet."""
        return len(self._raw) + len(self._pending)

    def discard_backlog(self) -> int:
        """Drop what poll() has not returned (a run ending now will not show it): records
        not decoded yet, and events decoded when a Ctrl-C cut poll() short.  They count
        as lost.  Returns how many."""
        n = self.backlog_len()
        self._raw.clear()
        self._pending = []
        self._user_lost += n
        return n

    def _kernel_lost(self) -> int:
        return sum(int(v) for v in self._bpf["lost"][0]) if self.events else 0

    def lost_events(self) -> int:
        """Events that never became Events, cumulative: the kernel's ring buffer was full,
        the backlog was full, they were discarded undecoded at exit, or could not be decoded."""
        kernel_lost = self._kernel_lost() if self._bpf is not None else self._kernel_lost_at_close
        return kernel_lost + self._user_lost + self.decode_errors

    def netns_knobs(self) -> dict[int, dict]:
        """{netns inode: {be_liberal, loose, ignore_invalid_rst, log_invalid, checksum}} as the probes read them."""
        out = dict(self._knobs)
        if self._bpf is not None:
            for k, v in self._bpf["netns_knobs"].items():
                out[int(k.value)] = {"be_liberal": v.be_liberal, "loose": v.loose,
                                     "ignore_invalid_rst": None if v.ignore_invalid_rst == 255 else v.ignore_invalid_rst,
                                     "log_invalid": v.log_invalid, "checksum": v.checksum}
        return out

    # -- aggregation
    def read_aggregates(self) -> list[AggregateRow]:
        """All rows of the in-kernel aggregation map (aggregate=True), wall-clock times."""
        if self._bpf is None or not self.aggregate:
            return []
        rows = []
        for k, v in self._bpf["aggs"].items():
            key = CtAggKey.from_buffer_copy(bytes(k))
            val = CtAggVal.from_buffer_copy(bytes(v))
            rows.append(decode_aggregate(key, val, self._clock_offset))
        return rows

    def aggregate_overflow(self) -> int:
        """Keys lost to the bounded map: LRU evictions (keys inserted - keys present,
        user space never deletes) plus inserts that failed outright; counted in-kernel."""
        if self._bpf is None or not self.aggregate:
            return 0
        stats = self._bpf["agg_stats"]
        inserted, failed = int(stats[0].value), int(stats[1].value)
        present = sum(1 for _ in self._bpf["aggs"].keys())
        return max(0, inserted - present) + failed


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
