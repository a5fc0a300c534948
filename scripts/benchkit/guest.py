"""The guest side of scripts/bench: every lab measure in ONE guest boot.

    python3 scripts/benchkit/guest.py --out DIR [--reps N] [--quick] [--phases a,b,..]
                                      [--pwru BIN --pwru-libdir DIR]

Run as root in a lab guest from the checkout root (scripts/bench does that). Writes
DIR/guest.json (all numbers, raw samples included) and DIR/guest.log.

Phases (each records its own error and the run goes on):
  startup     in-process Probe for trace (events) and top (aggregate): import / plan /
              bcc import / BPF compile / attach, and time to the first event
  throughput  iperf3 bulk TCP through the server netns' conntrack firewall, A/B rotation
              over base / trace / top / log_invalid=6, using the two in-process probes
              (kprobes detached and re-attached between samples: no recompile)
  pwru        pwru filtered to the server host: start-up, then a block of samples with
              pwru running and a block without (pwru cannot be detached without a restart)
  capacity    out-of-window floods at rising rates, one tool at a time: `conntrace top
              --json`, `conntrace trace --json`, a bpftrace one-liner and the kernel's own
              log; events reported vs injected vs conntrack's invalid counter, lost events,
              the tool's CPU; plus, for top and trace, RSS with 1 / 1 000 / 100 000 distinct
              senders (memory)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.lab import netlab  # noqa: E402
from tests.lab.flood import paced_send  # noqa: E402
from tests.lab.packets import ACK, FIN, PSH, SYN, Segment, internet_checksum  # noqa: E402
from tests.lab.scenarios import (ADDRS, CLIENT_MAC, SERVER_MAC, build_topology,  # noqa: E402
                                 open_connection)

CLK_TCK = os.sysconf("SC_CLK_TCK")
KPROBE_LIST = "/sys/kernel/debug/kprobes/list"


def bpftrace_program() -> str:
    """The bpftrace one-liner a user would write instead of `conntrace trace`: one line per
    rejected segment. On 6.1+ kernels nf_tcp_log_invalid calls nf_ct_l4proto_log_invalid
    (which returns early when log_invalid is 0), so probing both would print two lines per
    window failure: the window logger and tcp_error's nf_l4proto_log_invalid are probed, or
    nf_ct_l4proto_log_invalid where nf_tcp_log_invalid does not exist (before 6.1)."""
    with open("/proc/kallsyms") as fh:
        has_tcp = any(line.rstrip().split()[2:3] == ["nf_tcp_log_invalid"] for line in fh)
    first = "nf_tcp_log_invalid" if has_tcp else "nf_ct_l4proto_log_invalid"
    return (f'kprobe:{first},kprobe:nf_l4proto_log_invalid '
            '{ printf("%llu %s %s %d\\n", nsecs, probe, comm, cpu); }')
LOG = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


def summary(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "spread_pct": round(100 * (max(vals) - min(vals)) / statistics.median(vals), 2)
            if statistics.median(vals) else None}


def registered_kprobes() -> list[str]:
    try:
        with open(KPROBE_LIST) as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError:
        return []


def conntrack_kprobes() -> int:
    return sum(1 for k in registered_kprobes() if "log_invalid" in k)


def proc_cpu(pid: int) -> float | None:
    """utime+stime of pid and its reaped children, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_mem(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) // 1024     # MiB
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# The kernel log: count records through /dev/kmsg sequence numbers, so a ring-buffer overrun
# (the buffer holds a few hundred conntrack lines) does not hide what the kernel logged.

def kmsg_mark(tag: str) -> int:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        with open("/dev/kmsg", "w") as w:
            w.write(f"conntrace-bench: {tag}\n")
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                rec = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                continue
            head, _, body = rec.partition(";")
            if f"conntrace-bench: {tag}" in body:
                return int(head.split(",")[1])
        raise RuntimeError("kmsg marker not seen")
    finally:
        os.close(fd)


def kmsg_between(seq_a: int, seq_b: int) -> dict:
    """Records between two markers: how many the kernel logged (sequence numbers), how many of
    those were still readable, and how many of the readable ones were conntrack's."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    readable = conntrack = suppressed = 0
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError:
                continue
            head, _, body = rec.partition(";")
            seq = int(head.split(",")[1])
            if seq_a < seq < seq_b:
                readable += 1
                if "nf_ct_proto_" in body:
                    conntrack += 1
                if "suppressed" in body:
                    suppressed += 1
            if seq >= seq_b:
                break
    finally:
        os.close(fd)
    return {"logged": seq_b - seq_a - 1, "readable": readable, "conntrack_readable": conntrack,
            "suppressed_notes": suppressed}


# ---------------------------------------------------------------------------------------------
# Traffic

class Lab:
    """One topology for the whole run: client/server netns, conntrack firewall in the server,
    an established connection whose out-of-window segment is the flood, iperf3 server."""

    def __init__(self):
        self.netlab = netlab.NetLab()
        self.topo = build_topology(self.netlab)
        self.srv, self.cli = self.topo.server_ns, self.topo.client_ns
        self.set_log_invalid(0)          # build_topology turns the kernel's log on
        self.conn = open_connection(self.topo, "ipv4", 77)
        seg = Segment(self.conn.client_addr, self.conn.server_addr, self.conn.cport, self.conn.sport,
                      seq=(self.conn.client_next + (1 << 30)) & 0xFFFFFFFF, ack=self.conn.server_next,
                      flags=ACK | PSH, payload=b"x" * 16)
        self.flood_frame = seg.frame(SERVER_MAC, CLIENT_MAC)
        self.netns_inode = os.stat(os.path.join(netlab.NETNS_DIR, self.srv)).st_ino
        self._distinct: list[bytes] = []
        with netlab.netns(self.srv):
            self.iperf_server = subprocess.Popen(["iperf3", "-s", "-B", ADDRS["ipv4"][1]],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def set_log_invalid(self, value: int) -> None:
        netlab.write_sysctl("net.netfilter.nf_conntrack_log_invalid", value, ns=self.srv)

    def ct_invalid(self) -> int:
        return netlab.read_ct_stats(self.srv).get("invalid", 0)

    def distinct_frames(self, n: int) -> list[bytes]:
        """SYN+FIN from n distinct addresses in 198.18.0.0/15, built by patching one template
        (the checksums are recomputed; Segment.frame per sender is too slow under TCG)."""
        if len(self._distinct) >= n:
            return self._distinct[:n]
        server = ADDRS["ipv4"][1]
        tmpl = Segment("198.18.0.1", server, 1024, 80, seq=0, flags=SYN | FIN).frame(SERVER_MAC, CLIENT_MAC)
        eth, ip, tcp = tmpl[:14], bytearray(tmpl[14:34]), bytearray(tmpl[34:])
        dst = socket.inet_aton(server)
        base = int.from_bytes(socket.inet_aton("198.18.0.1"), "big")
        out = self._distinct
        for i in range(len(out), n):
            src = (base + i).to_bytes(4, "big")
            ip[12:16] = src
            ip[10:12] = b"\0\0"
            ip[10:12] = struct.pack("!H", internet_checksum(bytes(ip)))
            tcp[0:2] = struct.pack("!H", 1024 + i % 60000)
            tcp[4:8] = struct.pack("!I", i)
            tcp[16:18] = b"\0\0"
            pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
            tcp[16:18] = struct.pack("!H", internet_checksum(pseudo + bytes(tcp)))
            out.append(eth + bytes(ip) + bytes(tcp))
        return out[:n]

    def inject(self, frames, rate: float) -> float:
        """Send frames, at most `rate` per second (0: flat out); seconds taken."""
        return paced_send(self.topo.injector, frames, rate)

    def flood(self, count: int, rate: float, frames=None) -> dict:
        frames = frames if frames is not None else [self.flood_frame] * count
        before, drops = self.ct_invalid(), self.topo.counter.packets()
        secs = self.inject(frames, rate)
        time.sleep(0.3)
        return {"injected": len(frames), "rate_asked": rate, "seconds": round(secs, 3),
                "rate_achieved": round(len(frames) / secs, 1) if secs else None,
                "ct_invalid_delta": self.ct_invalid() - before,
                "nft_drop_delta": self.topo.counter.packets() - drops}

    def iperf(self, seconds: float) -> dict:
        with netlab.netns(self.cli):
            proc = subprocess.run(["iperf3", "-c", ADDRS["ipv4"][1], "-t", str(seconds), "-J",
                                   "-B", ADDRS["ipv4"][0]], capture_output=True, text=True,
                                  timeout=seconds + 60)
        try:
            data = json.loads(proc.stdout)
            end = data["end"]
            return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                    "retransmits": end.get("sum_sent", {}).get("retransmits"),
                    "cpu_host_pct": end.get("cpu_utilization_percent", {}).get("host_total")}
        except (ValueError, KeyError) as exc:
            raise RuntimeError(f"iperf3 failed ({proc.returncode}): {proc.stderr.strip()[-300:]} "
                               f"{proc.stdout.strip()[-300:]}") from exc

    def close(self) -> None:
        self.iperf_server.terminate()
        try:
            self.iperf_server.wait(5)
        except subprocess.TimeoutExpired:
            self.iperf_server.kill()
        self.conn.close()
        self.topo.counter.close()
        self.topo.injector.close()
        self.netlab.close()


# ---------------------------------------------------------------------------------------------
# In-process probes (phase startup + throughput)

# Probe.start() maps plan.probes ("kprobe:<function>") to these BPF functions; we repeat the
# mapping here to detach and re-attach the same compiled programs between A/B samples
# (BPF.detach_kprobe / attach_kprobe on p._bpf), so each variant compiles only once.
FN_FOR = {"kprobe:nf_tcp_log_invalid": "on_tcp_log_invalid",
          "kprobe:nf_ct_l4proto_log_invalid": "on_ct_log_invalid",
          "kprobe:nf_l4proto_log_invalid": "on_l4_log_invalid"}


_libc = None


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a loaded BPF program (BPF_OBJ_GET_INFO_BY_FD; counted only
    while kernel.bpf_stats_enabled=1). Offsets from linux/bpf.h: run_time_ns 192, run_cnt 200."""
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    info = ctypes.create_string_buffer(232)
    attr = struct.pack("=IIQ", fd, 232, ctypes.addressof(info)) + b"\0" * 104
    abuf = ctypes.create_string_buffer(attr, len(attr))
    if _libc.syscall(321, 15, abuf, len(attr)) != 0:          # SYS_bpf, BPF_OBJ_GET_INFO_BY_FD
        raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD")
    run_time_ns, run_cnt = struct.unpack_from("=QQ", info.raw, 192)
    return run_cnt, run_time_ns


class InProcess:
    """A Probe plus a thread doing what the CLI's loop does (trace: poll + JSON; top: read the
    map each second), switchable on/off without recompiling."""

    def __init__(self, kind: str, timings: dict):
        import conntrace.probe as probe_mod
        from conntrace.bccfind import import_bcc
        self.kind = kind
        t = time.perf_counter()
        plan = probe_mod.plan_attach()
        timings["plan_attach"] = time.perf_counter() - t
        t = time.perf_counter()
        bcc = import_bcc()
        timings["import_bcc"] = time.perf_counter() - t
        real_bpf = bcc.BPF
        compile_time = {}

        class TimedBPF(real_bpf):               # separates compile (BPF()) from attach
            def __init__(self, *a, **kw):
                t0 = time.perf_counter()
                super().__init__(*a, **kw)
                compile_time["s"] = time.perf_counter() - t0

        bcc.BPF = TimedBPF
        try:
            self.probe = probe_mod.Probe(plan, aggregate=(kind == "top"), events=(kind == "trace"))
            t = time.perf_counter()
            self.probe.start()
            total = time.perf_counter() - t
        finally:
            bcc.BPF = real_bpf
        timings["compile"] = compile_time.get("s")
        timings["attach"] = total - compile_time.get("s", 0.0)
        timings["probes"] = list(plan.probes)
        self.attached = True
        self.running = False
        self.thread = None
        self.events = 0
        self.cpu_thread = 0.0

    def attach(self, on: bool) -> None:
        b = self.probe._bpf
        if on and not self.attached:
            for p in self.probe.plan.probes:
                b.attach_kprobe(event=p.split(":", 1)[1], fn_name=FN_FOR[p])
        elif not on and self.attached:
            for p in self.probe.plan.probes:
                b.detach_kprobe(event=p.split(":", 1)[1])
        self.attached = on

    def stats(self) -> dict:
        """BPF program runs and in-kernel time of our programs, plus the loop thread's CPU."""
        runs = ns = 0
        for name in set(FN_FOR.values()):
            fn = self.probe._bpf.funcs.get(name.encode()) or self.probe._bpf.funcs.get(name)
            if fn is not None:
                c, t = prog_stats(fn.fd)
                runs, ns = runs + c, ns + t
        return {"bpf_runs": runs, "bpf_ns": ns, "loop_cpu_s": self.cpu_thread}

    def _loop(self):
        from conntrace.ndjson import dumps
        t_cpu = time.thread_time()
        with open(os.devnull, "w") as sink:
            while self.running:
                now = time.thread_time()
                self.cpu_thread += now - t_cpu
                t_cpu = now
                if self.kind == "trace":
                    for ev in self.probe.poll(timeout_ms=100):
                        sink.write(dumps(ev.to_dict()) + "\n")
                        self.events += 1
                    self.probe.lost_events()
                else:
                    time.sleep(1.0)
                    self.probe.read_aggregates()
                    self.probe.aggregate_overflow()

    def set(self, on: bool) -> None:
        self.attach(on)
        if on and not self.running:
            self.running = True
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        elif not on and self.running:
            self.running = False
            self.thread.join()

    def close(self):
        self.set(False)
        self.attach(True)         # leave the BPF object consistent for cleanup()
        self.probe.close()


def phase_startup(lab: Lab, res: dict, state: dict, kinds=("trace", "top")) -> None:
    for kind in kinds:
        timings: dict = {}
        t = time.perf_counter()
        if "conntrace.probe" not in sys.modules:
            import conntrace.probe  # noqa: F401
            timings["import_conntrace"] = time.perf_counter() - t
        else:
            timings["import_conntrace"] = 0.0
        inproc = InProcess(kind, timings)
        timings["total_to_attached"] = time.perf_counter() - t
        if kind == "trace":
            # first event: one out-of-window segment, then poll until it is decoded
            t_inj = time.perf_counter()
            lab.inject([lab.flood_frame], 0)
            got = []
            while not got and time.perf_counter() - t_inj < 30:
                got = inproc.probe.poll(timeout_ms=100)
            timings["inject_to_first_event"] = time.perf_counter() - t_inj if got else None
            timings["first_event_reason"] = got[0].reason if got else None
        else:
            lab.inject([lab.flood_frame], 0)
            t_inj = time.perf_counter()
            n = 0
            while not n and time.perf_counter() - t_inj < 30:
                n = sum(r.packets for r in inproc.probe.read_aggregates())
                time.sleep(0.05)
            timings["inject_to_counted"] = time.perf_counter() - t_inj if n else None
        inproc.set(False)
        state[kind] = inproc
        res[kind] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()}
        log(f"startup {kind}: {res[kind]}")


def phase_throughput(lab: Lab, res: dict, state: dict, reps: int, seconds: float) -> None:
    # "control" is an A/A slot: nothing attached, measured exactly like a variant; its ratio
    # shows the bias and noise of the method itself on this (TCG, shared) machine
    variants = ["base", "control", "log_invalid"] + [k for k in ("trace", "top") if k in state]

    def switch(name: str, on: bool):
        if name == "log_invalid":
            lab.set_log_invalid(6 if on else 0)
        elif name in state:
            state[name].set(on)

    # count our BPF programs' runs: on valid traffic they must not run at all
    res["bpf_stats_enabled"] = netlab.write_sysctl("kernel.bpf_stats_enabled", 1, required=False)
    lab.iperf(3)                      # warm-up (TCG translation, TCP caches), discarded
    # Sequence B X B Y B Z B X ...: every variant sample sits between two baseline samples and
    # its ratio is taken against their mean, so the slow drift of a shared TCG host cancels out;
    # the variant order rotates each repetition.
    others = [v for v in variants if v != "base"]
    samples = {v: [] for v in variants}
    ratios = {v: [] for v in others}
    order_log = ["base"]
    prev_base = lab.iperf(seconds)
    samples["base"].append(prev_base)
    for r in range(reps):
        order = others[r % len(others):] + others[:r % len(others)]
        for v in order:
            switch(v, True)
            st0 = state[v].stats() if v in state else None
            try:
                s = lab.iperf(seconds)
            finally:
                if st0 is not None:
                    st1 = state[v].stats()
                    s.update({k: round(st1[k] - st0[k], 4) for k in st0})
                switch(v, False)
            nxt = lab.iperf(seconds)
            samples[v].append(s)
            samples["base"].append(nxt)
            order_log += [v, "base"]
            ratio = s["mbps"] / ((prev_base["mbps"] + nxt["mbps"]) / 2)
            ratios[v].append(ratio)
            prev_base = nxt
            log(f"throughput rep {r + 1}/{reps} {v:12} {s['mbps']:.0f} Mbit/s, "
                f"ratio to neighbouring base {ratio:.3f}")
    res["seconds_per_sample"] = seconds
    res["order"] = order_log
    res["samples"] = samples
    base = summary([s["mbps"] for s in samples["base"]])
    res["variants"] = {"base": {**base, "ratio": 1.0, "ratio_per_rep": {}}}
    for v in others:
        st = summary([s["mbps"] for s in samples[v]])
        st["ratio_of_medians"] = round(st["median"] / base["median"], 4) if base.get("median") else None
        st["ratio_per_rep"] = summary(ratios[v])
        # the headline ratio: median of the per-sample ratios to the neighbouring baselines
        st["ratio"] = round(st["ratio_per_rep"]["median"], 4) if ratios[v] else None
        if v in state:
            st["bpf_runs_during_samples"] = sum(x.get("bpf_runs", 0) for x in samples[v])
            st["bpf_ns_during_samples"] = sum(x.get("bpf_ns", 0) for x in samples[v])
            st["tool_loop_cpu_s_per_s"] = round(sum(x.get("loop_cpu_s", 0) for x in samples[v])
                                                / (seconds * len(samples[v])), 4)
        res["variants"][v] = st
    netlab.write_sysctl("kernel.bpf_stats_enabled", 0, required=False)


def phase_pwru(lab: Lab, res: dict, reps: int, seconds: float, pwru: str, libdir: str,
               start_timeout: float, stop_timeout: float) -> None:
    """pwru cannot be detached and re-attached cheaply (it registers ~1 350 kprobes: over a
    minute to start and minutes to unregister under TCG), so: a block of baseline samples,
    then pwru started once and a block of samples with it. It runs last in the guest."""
    if not pwru or not os.path.exists(pwru):
        res["error"] = "pwru binary not available (scripts/bench could not fetch it)"
        return
    env = dict(os.environ, LD_LIBRARY_PATH=libdir or "")
    server = ADDRS["ipv4"][1]
    lab.iperf(2)                                    # warm-up, discarded
    off = [lab.iperf(seconds) for _ in range(reps)]
    res["samples"] = {"base": off}
    before = len(registered_kprobes())
    err_path = Path("/tmp/pwru.err")
    argv = [pwru, "--output-file", "/dev/null", f"host {server}"]
    res["argv"] = argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(err_path, "w"))
    try:
        ready = None
        while time.perf_counter() - t0 < start_timeout:
            if "Listening for events" in err_path.read_text(errors="replace"):
                ready = time.perf_counter() - t0
                break
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        res["kprobes_registered"] = len(registered_kprobes()) - before
        tail = err_path.read_text(errors="replace")
        res["stderr_tail"] = tail[tail.rfind("100.00%") - 80 if "100.00%" in tail else -600:][-600:]
        if ready is None:
            res["error"] = (f"pwru exited with {proc.returncode} before listening" if proc.poll() is not None
                            else f"pwru not listening after {start_timeout:.0f} s (TCG); stopped")
            res["start_seconds"] = None
            log(f"pwru: {res['error']}")
            return
        res["start_seconds"] = round(ready, 2)
        log(f"pwru listening after {ready:.1f} s, {res['kprobes_registered']} kprobes")
        cpu0 = proc_cpu(proc.pid)
        on = []
        for _ in range(reps):
            try:
                on.append(lab.iperf(seconds))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res.setdefault("sample_errors", []).append(str(exc)[:300])
        res["samples"]["pwru"] = on
        res["cpu_seconds_during_samples"] = round((proc_cpu(proc.pid) or 0) - (cpu0 or 0), 2)
        a, b = summary([s["mbps"] for s in on]), summary([s["mbps"] for s in off])
        res["pwru"], res["base"] = a, b
        res["ratio"] = round(a["median"] / b["median"], 4) if a.get("median") and b.get("median") else None
        log(f"pwru: {a.get('median')} vs base {b.get('median')} Mbit/s, ratio {res['ratio']}")
    finally:
        t = time.perf_counter()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(stop_timeout)
            res["stop_seconds"] = round(time.perf_counter() - t, 2)
        except subprocess.TimeoutExpired:
            proc.kill()                 # the kernel keeps unregistering; the guest powers off next
            res["stop_seconds"] = f"> {stop_timeout:.0f} (killed)"
        log(f"pwru stopped: {res['stop_seconds']} s")


# ---------------------------------------------------------------------------------------------
# CLI tools under floods (phase capacity + memory)

class StreamCounter:
    """Reads a tool's stdout pipe in a thread: counts lines, 'lost' records, keeps top snapshots."""

    def __init__(self, proc, kind: str):
        self.proc, self.kind = proc, kind
        self.lines = 0
        self.events = 0
        self.lost_total = 0
        self.summary = None
        self.last_snapshot = None
        self.snapshots = 0
        self.first_line_at = None
        self.bpftrace_lost = 0
        self.attaching_at = None
        self.other = []
        self.history: list = []           # top: packets counted in each snapshot
        self._buf = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self, line: bytes):
        self.lines += 1
        if self.kind == "trace":
            if b'"type":"lost"' in line:
                self.lost_total = json.loads(line)["total"]
            elif b'"type":"summary"' in line:
                self.summary = json.loads(line)
            elif b'"type":"event"' in line:
                self.events += 1
                if self.first_line_at is None:
                    self.first_line_at = time.perf_counter()
            elif len(self.other) < 20:
                self.other.append(line[:300].decode("utf-8", "replace"))
        elif self.kind == "top":
            if line.startswith(b"{"):
                self.last_snapshot = json.loads(line)
                self.snapshots += 1
                self.history.append(self.top_packets())
        elif self.kind == "bpftrace":
            if line.startswith(b"Attaching"):
                self.attaching_at = time.perf_counter()
            elif b"kprobe:" in line:
                self.events += 1
                if self.first_line_at is None:
                    self.first_line_at = time.perf_counter()
            elif line.startswith(b"Lost"):
                try:
                    self.bpftrace_lost += int(line.split()[1])
                except (IndexError, ValueError):
                    pass
            elif len(self.other) < 20:
                self.other.append(line[:300].decode("utf-8", "replace"))

    def _run(self):
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data = self._buf + chunk
            *lines, self._buf = data.split(b"\n")
            with self.lock:
                for line in lines:
                    self._line(line)

    def top_packets(self, peer_prefix: str | None = None) -> int | None:
        snap = self.last_snapshot
        if snap is None:
            return None
        return sum(g["packets"] for g in snap["groups"]
                   if peer_prefix is None or any(p.startswith(peer_prefix) for p in g.get("peers") or [g["label"]]))

    def state(self) -> dict:
        with self.lock:
            return {"lines": self.lines, "events": self.events, "lost": self.lost_total,
                    "bpftrace_lost": self.bpftrace_lost, "snapshots": self.snapshots,
                    "top_packets": self.top_packets(), "top_lost": (self.last_snapshot or {}).get("lost"),
                    "top_overflow": (self.last_snapshot or {}).get("map_overflow")}


class Tool:
    def __init__(self, kind: str, argv: list[str], attach_timeout: float):
        self.kind = kind
        self.err_path = Path(f"/tmp/bench-{kind}.err")
        before = conntrack_kprobes()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=CHECKOUT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(self.err_path, "w"))
        self.stream = StreamCounter(self.proc, kind)
        self.attached_after = None
        # attached = the kernel has registered our log_invalid kprobes (works for --json, which
        # prints no "Hit Ctrl-C" line, and for bpftrace)
        while time.perf_counter() - self.t0 < attach_timeout:
            if conntrack_kprobes() > before:
                time.sleep(0.3)                   # the other probes of the plan follow at once
                self.attached_after = time.perf_counter() - self.t0
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode} before attaching: "
                                   + self.err_path.read_text(errors="replace")[-800:])
            time.sleep(0.2)
        if self.attached_after is None:
            self.stop()
            raise RuntimeError(f"{kind} not attached after {attach_timeout:.0f} s")

    def cpu(self) -> float | None:
        return proc_cpu(self.proc.pid)

    def mem(self) -> dict:
        return proc_mem(self.proc.pid)

    def settle(self, quiet: float = 1.5, cap: float = 120.0) -> float:
        """Wait until the tool has caught up: its output has not grown and it used less than
        a fifth of a CPU for `quiet` seconds (a busy decoder prints nothing while it works
        through the ring buffer), or `cap` seconds."""
        t0 = time.perf_counter()
        if self.kind == "top":
            # caught up = two snapshots taken after this call that count the same packets
            # (a busy top takes longer than its interval to produce one)
            n0 = self.stream.snapshots
            while time.perf_counter() - t0 < cap:
                with self.stream.lock:
                    h = self.stream.history[n0:]
                if len(h) >= 2 and h[-1] == h[-2]:
                    break
                time.sleep(0.2)
            return time.perf_counter() - t0
        last, since, cpu_since = None, time.perf_counter(), self.cpu() or 0.0
        while time.perf_counter() - t0 < cap:
            st = self.stream.state()
            cur = st["lines"]
            now = time.perf_counter()
            if cur != last:
                last, since, cpu_since = cur, now, self.cpu() or 0.0
            elif now - since >= quiet:
                busy = ((self.cpu() or 0.0) - cpu_since) / (now - since)
                if busy < 0.2:
                    break
                since, cpu_since = now, self.cpu() or 0.0
            time.sleep(0.2)
        return time.perf_counter() - t0

    def stop(self) -> dict:
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed"
        self.stream.thread.join(10)
        return {"rc": rc, "stop_seconds": round(time.perf_counter() - t, 2),
                "stderr_tail": self.err_path.read_text(errors="replace")[-600:]}


def measure_flood(lab: Lab, tool: Tool | None, kind: str, count: int, rate: float, frames=None) -> dict:
    kmsg_a = kmsg_mark(f"{kind}-{rate}-a") if kind == "kernel_log" else None
    st0 = tool.stream.state() if tool else None
    cpu0 = tool.cpu() if tool else None
    t0 = time.perf_counter()
    fl = lab.flood(count, rate, frames)
    if tool:
        fl["catch_up_seconds"] = round(tool.settle(), 2)
        st1 = tool.stream.state()
        fl["tool_cpu_seconds"] = round((tool.cpu() or 0) - (cpu0 or 0), 2)
        fl["wall_seconds"] = round(time.perf_counter() - t0, 2)
        if kind == "trace":
            fl["reported"] = st1["events"] - st0["events"]
            fl["lost"] = st1["lost"] - st0["lost"]
            fl["reported_plus_lost"] = fl["reported"] + fl["lost"]
        elif kind == "top":
            fl["reported"] = (st1["top_packets"] or 0) - (st0["top_packets"] or 0)
            fl["lost"] = None
            fl["map_overflow"] = st1["top_overflow"]
            # the LRU map (16 384 keys) evicts senders beyond its size: their counts leave the
            # snapshot and are counted as overflow keys instead (1 packet per key here)
            fl["map_overflow_delta"] = (st1["top_overflow"] or 0) - (st0["top_overflow"] or 0)
            fl["reported_plus_evicted_keys"] = fl["reported"] + fl["map_overflow_delta"]
        elif kind == "bpftrace":
            fl["reported"] = st1["events"] - st0["events"]
            fl["lost"] = st1["bpftrace_lost"] - st0["bpftrace_lost"]
            fl["reported_plus_lost"] = fl["reported"] + fl["lost"]
        fl["rss_mib"] = tool.mem().get("VmRSS")
    else:
        time.sleep(1.0)
        kl = kmsg_between(kmsg_a, kmsg_mark(f"{kind}-{rate}-b"))
        fl["reported"] = kl["logged"]
        fl["kmsg"] = kl
        fl["lost"] = None
        fl["tool_cpu_seconds"] = None       # printk runs in the kernel, in the packet's context
    fl["exact"] = fl["reported"] == fl["injected"] == fl["ct_invalid_delta"] if kind in ("top",) else None
    if kind in ("trace", "bpftrace"):
        fl["accounted"] = fl["reported_plus_lost"] == fl["injected"]
    log(f"capacity {kind:10} rate {rate or 'max':>6} injected {fl['injected']:>6} at {fl['rate_achieved']}/s "
        f"ct {fl['ct_invalid_delta']:>6} reported {fl['reported']:>6} lost {fl['lost']} "
        f"cpu {fl.get('tool_cpu_seconds')}")
    return fl


# trace decodes ~100-150 events per CPU-second under TCG (~100x slower than natively), so
# its default backlog (65 536) would take minutes to drain after each flood and spill into
# the next; 8 192 drains within the settle cap and keeps each flood's accounting its own.
TRACE_BACKLOG = 8192


def phase_capacity(lab: Lab, res: dict, floods: list, senders: list, tools: list,
                   attach_timeout: float) -> None:
    for kind in tools:
        out = res.setdefault(kind, {})
        tool = None
        try:
            if kind in ("trace", "top"):
                argv = [sys.executable, "-m", "conntrace", kind, "--json"] + \
                       (["--interval", "1"] if kind == "top" else ["--backlog", str(TRACE_BACKLOG)])
                if kind == "trace":
                    out["backlog"] = TRACE_BACKLOG
            elif kind == "bpftrace":
                argv = ["bpftrace", "-e", bpftrace_program()]
                out["program"] = argv[-1]
            if kind == "kernel_log":
                lab.set_log_invalid(6)
            else:
                tool = Tool(kind, argv, attach_timeout)
                out["attached_after"] = round(tool.attached_after, 2)
                if kind == "bpftrace" and tool.stream.attaching_at:
                    out["compile_until_attaching_line"] = round(tool.stream.attaching_at - tool.t0, 2)
                out["rss_after_attach_mib"] = tool.mem()
                log(f"{kind}: attached after {tool.attached_after:.1f} s, {out['rss_after_attach_mib']}")
                # first event: one segment right after attach
                if kind in ("trace", "bpftrace"):
                    t_inj = time.perf_counter()
                    lab.inject([lab.flood_frame], 0)
                    while tool.stream.first_line_at is None and time.perf_counter() - t_inj < 30:
                        time.sleep(0.05)
                    if tool.stream.first_line_at:
                        out["inject_to_first_event"] = round(tool.stream.first_line_at - t_inj, 3)
                        out["start_to_first_event"] = round(tool.stream.first_line_at - tool.t0, 2)
                    tool.settle(quiet=1.0, cap=10)
            out["floods"] = [measure_flood(lab, tool, kind, count, rate) for count, rate in floods]
            if kind in ("trace", "top") and senders:
                mem = []
                for n in senders:
                    frames = lab.distinct_frames(n)
                    fl = measure_flood(lab, tool, kind, n, 0, frames)
                    fl["senders"] = n
                    fl["mem_mib"] = tool.mem()
                    mem.append(fl)
                    log(f"memory {kind} {n} senders: {fl['mem_mib']}")
                out["distinct"] = mem
            if tool:
                out["mem_final_mib"] = tool.mem()
                out["stream"] = tool.stream.state()
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            log(f"{kind}: FAILED {exc}")
        finally:
            if kind == "kernel_log":
                lab.set_log_invalid(0)
            if tool:
                out["stop"] = tool.stop()
                if kind == "trace":
                    out["summary_record"] = {k: v for k, v in (tool.stream.summary or {}).items()
                                             if k in ("events", "lost", "filtered", "duration")}
                    out["other_lines"] = tool.stream.other


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global LOG
    p = argparse.ArgumentParser(prog="scripts/benchkit/guest.py")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--phases", default="startup,throughput,capacity,pwru")
    p.add_argument("--tools", default="top,trace,bpftrace,kernel_log")
    p.add_argument("--pwru", default="")
    p.add_argument("--pwru-libdir", default="")
    p.add_argument("--iperf-seconds", type=float, default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = open(out / "guest.log", "w")
    quick = args.quick
    seconds = args.iperf_seconds or (2.0 if quick else 3.0)
    if quick:
        floods = [(2000, 1000), (20000, 0)]
        senders = [1, 1000, 10000]
    else:
        floods = [(3000, 1000), (10000, 5000), (20000, 20000), (40000, 0)]
        senders = [1, 1000, 100000]
    phases = args.phases.split(",")
    res = {"kernel": os.uname().release, "proc_version": Path("/proc/version").read_text().strip(),
           "cpus": os.cpu_count(), "python": sys.version.split()[0], "quick": quick, "reps": args.reps,
           "floods_asked": floods, "senders_asked": senders, "phases": {}, "started": time.time()}
    try:
        res["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
        res["mem_total_mib"] = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except OSError:
        pass

    def save():
        (out / "guest.json").write_text(json.dumps(res, indent=1, default=str))

    t_setup = time.perf_counter()
    lab = Lab()
    res["setup_seconds"] = round(time.perf_counter() - t_setup, 2)
    log(f"topology ready in {res['setup_seconds']} s (server netns {lab.srv}, inode {lab.netns_inode})")
    state: dict = {}
    try:
        for name in phases:
            t0 = time.perf_counter()
            pres = res["phases"].setdefault(name, {})
            log(f"phase {name} ...")
            try:
                if name == "startup":
                    # --quick: one in-process compile (trace); top's in-kernel programs hang
                    # off the same three kprobes, its valid-traffic cost is measured in full runs
                    phase_startup(lab, pres, state, ("trace",) if quick else ("trace", "top"))
                elif name == "throughput":
                    phase_throughput(lab, pres, state, args.reps, seconds)
                    for inproc in state.values():       # free the memory before the CLI runs
                        inproc.close()
                    state.clear()
                elif name == "pwru":
                    phase_pwru(lab, pres, max(2, args.reps - 1) if quick else args.reps, seconds,
                               args.pwru, args.pwru_libdir, 180 if quick else 300, 60 if quick else 90)
                elif name == "capacity":
                    phase_capacity(lab, pres, floods, senders, args.tools.split(","), 600)
            except Exception as exc:
                pres["error"] = f"{type(exc).__name__}: {exc}"
                pres["traceback"] = traceback.format_exc()
                log(f"phase {name} FAILED: {exc}")
            pres["phase_seconds"] = round(time.perf_counter() - t0, 1)
            log(f"phase {name} done in {pres['phase_seconds']} s")
            save()
    finally:
        for inproc in state.values():
            try:
                inproc.close()
            except Exception:
                pass
        lab.close()
        res["ended"] = time.time()
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
