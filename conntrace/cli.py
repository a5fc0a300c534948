"""Command line: conntrace trace | top | advise | report | doctor.

The probe (BPF, bcc) is imported only when a live command runs, so `--from FILE` replay,
`--help` and the unit tests work on machines without bcc or root.  Expected failures
become one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import replace
from typing import Optional

import click

from . import __version__
from .advise import APPLY, AdviceInput, advise as run_rules
from .aggregate import (GROUPINGS, CountRow, from_probe_rows, group_rows, recording_span,
                        rows_from_events, with_rates)
from .anonymize import Anonymizer
from .events import REASONS, VERDICTS, SCHEMA_VERSION, RECORD_TOP, RECORD_SUMMARY
from .ndjson import RecordingError, Writer, dumps, read_recording
from . import render, sysctl
from .report import (Capture, EventBudget, capture_from_recording, collect_ruleset, host_facts,
                     write_bundle)
from .sysctl import SysctlError

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


# ---- plumbing shared by the commands --------------------------------------------------

class Fail(click.ClickException):
    """One-line error, exit status 1."""

    def show(self, file=None):
        click.echo(f"conntrace: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (RecordingError, SysctlError) as e:
            raise Fail(str(e)) from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as e:
            # The probe's ProbeError is a one-line user message by contract; the class comes
            # from a lazily imported module, so match it by name.
            if type(e).__name__ == "ProbeError":
                raise Fail(str(e)) from None
            raise


def load_probe():
    """Import the BPF probe only now; without bcc say what to install."""
    try:
        from . import probe
    except ImportError as e:
        raise Fail(f"the BPF probe cannot be loaded ({e}); run `conntrace doctor`, or replay a "
                   "recording with --from FILE") from None
    return probe


def stdout_is_tty() -> bool:
    """Refresh in place only on a terminal; `| tee` gets one plain table per interval."""
    return sys.stdout.isatty()


def is_root() -> bool:
    return os.geteuid() == 0


def require_root(command: str):
    if not is_root():
        raise Fail(f"`conntrace {command}` needs root to load BPF programs: run it with sudo "
                   "(replaying a recording with --from FILE needs no root)")


class StopRequest:
    """What SIGINT/SIGTERM asked for.  Normally the signal raises KeyboardInterrupt at once;
    inside ``deferred()`` it only sets ``requested``, for work that must not be cut in half
    (a batch of events being shown: each is shown or counted as lost, never half-done)."""

    def __init__(self):
        self.requested = False
        self._deferring = False

    def handler(self, signum, frame):
        self.requested = True
        if not self._deferring:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT stop the command: its finally blocks detach the probe.

    SIGINT is handled even when it was ignored at start: a shell starts `conntrace top &`
    with SIGINT ignored, and `kill -INT` must still stop it cleanly."""
    stop = StopRequest()
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            saved[sig] = signal.getsignal(sig)
            signal.signal(sig, stop.handler)
        except ValueError:  # not the main thread (tests): Ctrl-C handling still applies
            saved.pop(sig, None)
    try:
        yield stop
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def make_anonymizer(anonymize: bool, keep_prefix: Optional[int]) -> Optional[Anonymizer]:
    if keep_prefix is not None and not anonymize:
        raise click.BadParameter("only makes sense with --anonymize",
                                 param_hint="--anonymize-keep-prefix")
    return Anonymizer(keep_prefix=keep_prefix) if anonymize else None


def _cidr(ctx, param, values):
    out = []
    for v in values or ():
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise click.BadParameter(f"{v!r} is not an address or CIDR (e.g. 203.0.113.0/24)")
    return tuple(out)


def _reasons(ctx, param, values):
    out = []
    for v in values or ():
        if v.upper() not in REASONS:
            raise click.BadParameter(f"unknown reason {v!r}; use one of {', '.join(REASONS)}")
        out.append(v.upper())
    return tuple(out)


class EventFilter:
    """The user's --peer/--port/--netns/--reason/--verdict, applied in user space."""

    def __init__(self, peers=(), port=None, netns=None, reasons=(), verdicts=()):
        self.peers, self.port, self.netns = peers, port, netns
        self.reasons, self.verdicts = set(reasons), set(verdicts)

    def __call__(self, ev) -> bool:
        if self.port is not None and self.port not in (ev.sport, ev.dport):
            return False
        return self._passes(ev.netns, ev.reason, ev.verdict, (ev.saddr, ev.daddr))

    def matches_row(self, row) -> bool:
        """The same filters on an in-kernel counter (no ports: --port is applied in-kernel)."""
        local = (row.local or "").rsplit(":", 1)[0].strip("[]")
        return self._passes(row.netns, row.reason, row.verdict, (row.peer, local))

    def _passes(self, netns, reason, verdict, addresses) -> bool:
        if self.netns is not None and netns != self.netns:
            return False
        if self.reasons and reason not in self.reasons:
            return False
        if self.verdicts and verdict not in self.verdicts:
            return False
        if self.peers:
            addrs = []
            for text in addresses:
                try:
                    addrs.append(ipaddress.ip_address(text))
                except ValueError:
                    pass
            if not any(a in net for a in addrs for net in self.peers if a.version == net.version):
                return False
        return True


def read_replay(path: str):
    rec = read_recording(path)
    if rec.skipped:
        click.echo(f"conntrace: {rec.skipped_note()}", err=True)
    return rec


def _knobs_for(inodes, cache: dict, nsmap: Optional[dict] = None) -> dict:
    missing = [i for i in inodes if i not in cache]
    if missing:
        try:
            cache.update(sysctl.read_all_sysctls(missing, nsmap))
        except SysctlError:
            cache.update({i: {} for i in missing})
    return {i: cache.get(i, {}) for i in inodes}


def _netns_names_json(nsmap: dict) -> dict:
    return {str(k): v for k, v in nsmap.items()}


def _short_names(nsmap: dict, own: Optional[int]) -> dict:
    out = {}
    for ino, entry in (nsmap or {}).items():
        ino = int(ino)
        if ino == own:
            out[ino] = f"host({ino})"
        elif entry.get("names"):
            out[ino] = f"{entry['names'][0]}({ino})"
    return out


def print_advice(advice, out=click.echo, verbose=True):
    if not advice:
        return
    out("")
    out("Advice:")
    out(render.advice_text(advice, verbose=verbose).rstrip())


def _plan_and_warn(mod):
    plan = mod.plan_attach()
    for what in getattr(plan, "missing", None) or []:
        click.echo(f"conntrace: rung {plan.rung}: will miss {what}", err=True)
    # BCC compiles the programs now: seconds natively, up to a minute in an emulated VM
    click.echo(f"conntrace: compiling and attaching {', '.join(plan.probes or []) or 'probes'} "
               f"(rung {plan.rung})...", err=True)
    return plan


_PROBE_KNOB_NAMES = {"be_liberal": "nf_conntrack_tcp_be_liberal", "loose": "nf_conntrack_tcp_loose",
                     "ignore_invalid_rst": "nf_conntrack_tcp_ignore_invalid_rst",
                     "log_invalid": "nf_conntrack_log_invalid", "checksum": "nf_conntrack_checksum"}


def _merge_probe_knobs(knobs: dict, probe) -> dict:
    """Fill knobs we could not read from /proc/sys with what the BPF program saw per netns."""
    try:
        seen = probe.netns_knobs() if hasattr(probe, "netns_knobs") else {}
    except Exception:
        return knobs
    for ino, k in (seen or {}).items():
        cur = dict(knobs.get(ino) or {})
        for short, full in _PROBE_KNOB_NAMES.items():
            if cur.get(full) is None and k.get(short) is not None:
                cur[full] = k[short]
        if ino in knobs or cur:
            knobs[ino] = cur
    return knobs


def _probe_filters(mod, netns, port):
    pf = getattr(mod, "ProbeFilters", None)
    return pf(netns=netns, port=port) if pf else None


# ---- the CLI ----------------------------------------------------------------------------

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="conntrace")
def cli():
    """See why Linux conntrack marks TCP segments INVALID, with the kernel's own numbers."""


_filter_options = [
    click.option("--peer", "peers", multiple=True, callback=_cidr, metavar="CIDR",
                 help="Only segments from or to this address/network (repeatable)."),
    click.option("--port", type=click.IntRange(1, 65535), help="Only segments with this port."),
    click.option("--netns", "netns", type=click.IntRange(min=1), metavar="INODE",
                 help="Only this network namespace (inode, see `lsns -t net`)."),
    click.option("--reason", "reasons", multiple=True, callback=_reasons, metavar="REASON",
                 help="Only this reason (repeatable): " + ", ".join(REASONS) + "."),
    click.option("--verdict", "verdicts", multiple=True, metavar="VERDICT",
                 type=click.Choice(VERDICTS),
                 help="Only this verdict (repeatable): " + ", ".join(VERDICTS) + "."),
]

_anon_options = [
    click.option("--anonymize", is_flag=True,
                 help="Replace every IP address by a consistent pseudonym, drop hostnames."),
    click.option("--anonymize-keep-prefix", type=click.IntRange(1, 127), metavar="BITS",
                 help="With --anonymize: addresses sharing this many leading bits share a "
                      "pseudonymous prefix (e.g. 24)."),
]


def _apply_options(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="NDJSON on stdout, one record per line.")
@click.option("--write", "write_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="Also record NDJSON to FILE while showing the table.")
@_apply_options(_filter_options)
@click.option("--count", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Stop after S seconds.")
@click.option("--from", "from_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Replay a recording instead of tracing (no BPF, no root).")
@click.option("--backlog", type=click.IntRange(min=1), default=65536, show_default=True,
              metavar="EVENTS", help="Events copied from the kernel that may wait to be shown "
              "(about 0.5 KiB each); a burst beyond it is counted as lost.")
@_apply_options(_anon_options)
def trace(as_json, write_path, peers, port, netns, reasons, verdicts, count, duration, from_path,
          backlog, anonymize, anonymize_keep_prefix):
    """One line per TCP segment conntrack rejects or ignores, reason first."""
    anon = make_anonymizer(anonymize, anonymize_keep_prefix)
    keep = EventFilter(peers, port, netns, reasons, verdicts)
    session = TraceSession(as_json=as_json, anonymizer=anon, count=count)
    if from_path:
        rec = read_replay(from_path)
        session.open_writer(write_path, rec.meta)
        for ev in rec.events:
            if session.offer(ev, keep):
                break
        session.lost = rec.lost
        if rec.lost and session.writer:
            session.writer.lost(rec.lost, (rec.summary or {}).get("ended") or 0.0)
        times = [e.time for e in session.budget.kept]
        span = (max(times) - min(times)) if times else 0.0
        # what the kernel counted and no event showed (a live trace writes it as omitted)
        unseen = [] if session.count_reached() else [
            o for o in rec.omitted if keep.matches_row(CountRow(
                netns=o["netns"], peer=o["peer"], reason=o["reason"], verdict=o["verdict"]))]
        session.finish(span, meta=rec.meta, summary=rec.summary, unseen=unseen)
        return
    mod = load_probe()
    require_root("trace")
    plan = _plan_and_warn(mod)
    nsmap = sysctl.netns_map()
    own = sysctl.own_netns_inode()
    meta = {"host": host_facts(plan), "rung": plan.rung, "own_netns": own,
            "netns_names": _netns_names_json(nsmap),
            "sysctls": {str(own): sysctl.read_sysctls()} if own else {},
            "filters": {"peer": [str(p) for p in peers], "port": port, "netns": netns,
                        "reason": list(reasons), "verdict": list(verdicts)}}
    session.open_writer(write_path, meta)
    started = time.time()
    # The in-kernel counters run beside the events: when a flood overruns user space, the
    # footer and the advice still give the kernel's exact totals.
    probe = mod.Probe(plan, aggregate=True, events=True, backlog=backlog,
                      filters=_probe_filters(mod, netns, port))
    kernel_rows = None
    with stop_on_signals() as stop:
        try:
            probe.start()
            started = time.time()   # --duration counts from attach, not from the compile
            # Always on stderr (even with --json): scripts wait for it to know probes are live.
            click.echo(f"Tracing conntrack INVALID/ignored TCP segments (rung {plan.rung})"
                       "... Hit Ctrl-C to end.", err=True)
            done = False
            while not (done or stop.requested):
                if duration and time.time() - started >= duration:
                    break
                # Ctrl-C waits for the batch (one poll: ~0.1 s of waiting plus decoding):
                # cut in the middle, its rest would be neither shown nor counted.
                with stop.deferred():
                    for ev in probe.poll(timeout_ms=100):
                        if session.offer(ev, keep):
                            done = True
                            break
                    session.note_lost(probe.lost_events())
        except KeyboardInterrupt:
            pass
        finally:
            try:
                if not session.count_reached():
                    probe.discard_backlog()       # copied, never shown: say so
                session.note_lost(probe.lost_events())
                kernel_rows = [r for r in from_probe_rows(probe.read_aggregates())
                               if keep.matches_row(r)]
            except Exception:
                pass
            knobs = _merge_probe_knobs({}, probe)     # read before close: the maps go with it
            probe.close()
    involved = sorted({e.netns for e in session.budget.kept} | ({own} if own else set()))
    for ino, k in _knobs_for(involved, {}, nsmap).items():
        knobs[ino] = {**knobs.get(ino, {}), **{n: v for n, v in k.items() if v is not None}}
    sysctls = {str(k): v for k, v in knobs.items() if k in involved}
    session.finish(time.time() - started, meta={**meta, "sysctls": sysctls},
                   summary={"sysctls": sysctls}, kernel_rows=kernel_rows)


class TraceSession:
    """Shows, writes and counts the events of one trace run (live or replayed)."""

    def __init__(self, as_json=False, anonymizer=None, count=None):
        self.as_json = as_json
        self.anon = anonymizer
        self.count = count
        self.writer: Optional[Writer] = None
        self.shown = 0
        self.filtered = 0
        self.lost = 0
        self.budget = EventBudget()
        self.header_done = False

    def open_writer(self, path, meta):
        if not path:
            return
        self.writer = Writer(path, anonymizer=self.anon)
        clean = {k: v for k, v in (meta or {}).items() if k not in ("schema", "type")}
        # a replayed recording keeps its own start time; a live run starts now
        self.writer.meta(**{"started": time.time(), **clean,
                            "anonymized": self.anon is not None or bool(clean.get("anonymized"))})

    def offer(self, ev, keep) -> bool:
        """Show/write one event if it passes the filters; True when --count is reached."""
        if not keep(ev):
            self.filtered += 1
            return False
        if self.anon is not None:
            ev = self.anon.event(ev)
        self.shown += 1
        self.budget.add(ev)
        if self.writer:
            self.writer.event(ev)
        if self.as_json:
            click.echo(dumps(ev.to_dict()))
        else:
            if not self.header_done:
                click.echo(render.trace_header())
                self.header_done = True
            click.echo(render.trace_line(ev))
        return self.count_reached()

    def count_reached(self) -> bool:
        return self.count is not None and self.shown >= self.count

    def note_lost(self, cumulative: int):
        if cumulative is None or cumulative <= self.lost:
            return
        new = cumulative - self.lost
        self.lost = cumulative
        now = time.time()
        if self.writer:
            self.writer.lost(new, now)
        if self.as_json:
            click.echo(dumps({"schema": SCHEMA_VERSION, "type": "lost", "count": new,
                              "total": cumulative, "time": now}))
        else:
            click.echo(render.lost_line(new, cumulative))

    def finish(self, seconds: float, meta: Optional[dict] = None, summary: Optional[dict] = None,
               kernel_rows=None, unseen=None):
        """Footer, summary record and advice.  kernel_rows: the in-kernel counters (live
        runs), which also count the events that never reached us; unseen: those counts as
        a recording keeps them (replay)."""
        meta = meta or {}
        summary = summary or {}
        sysctls = dict(meta.get("sysctls") or {})
        sysctls.update(summary.get("sysctls") or {})
        unseen = list(unseen or ())
        if self.anon is not None:
            unseen = [self.anon.record(u) for u in unseen]
        counted = None
        if kernel_rows is not None:
            if self.anon is not None:
                kernel_rows = [replace(r, peer=self.anon.address(r.peer)) for r in kernel_rows]
            unseen = _unseen(kernel_rows, self.budget)
            counted = sum(r.packets for r in kernel_rows)
        rows = rows_from_events(self.budget.kept, self.budget.omitted_records() + unseen)
        if counted is None and summary.get("counted") is not None:
            counted = sum(r.packets for r in rows)   # a replay: the file kept the kernel's counts
        inp = AdviceInput(events=self.budget.kept,
                          rows=rows,
                          sysctls=sysctls, netns_names=meta.get("netns_names") or {},
                          own_netns=meta.get("own_netns"),
                          kernel=(meta.get("host") or {}).get("kernel"))
        advice = run_rules(inp)
        totals = {"events": self.shown, "filtered": self.filtered, "lost": self.lost,
                  "duration": round(seconds, 3), "ended": summary.get("ended") or time.time()}
        if counted is not None:
            totals["counted"] = counted
        if self.writer:
            for om in unseen:      # a replay of the file then has the kernel's totals too
                self.writer.omitted(om["netns"], om["peer"], om["reason"], om["verdict"], om["count"])
            self.writer.summary(**totals, sysctls=sysctls)
            self.writer.close()
        if self.as_json:
            rec = {"schema": SCHEMA_VERSION, "type": RECORD_SUMMARY, **totals,
                   "advice": [a.to_dict() for a in advice]}
            click.echo(dumps(self.anon.record(rec) if self.anon else rec))
            return
        if not self.header_done:
            click.echo(render.trace_header())
        click.echo(render.trace_footer(self.shown, self.filtered, self.lost, seconds))
        if counted is not None and (unseen or counted != self.shown):
            by_reason = Counter()
            for r in rows:
                by_reason[r.reason] += r.packets
            click.echo(render.kernel_counted_line(counted, by_reason))
        if self.shown:
            click.echo(render.trace_legend())
        if self.anon:
            advice = [_anon_advice(self.anon, a) for a in advice]
        print_advice(advice)


def _anon_advice(anon, a):
    from .advise import Advice
    return Advice(**anon.record(a.to_dict()))


# ---- top ----------------------------------------------------------------------------------

def _owners(peers) -> dict:
    """peer address -> 'local:port pid/comm' for connections that terminate on this host."""
    try:
        import psutil
        conns = psutil.net_connections(kind="tcp")
    except Exception:       # psutil missing, or no permission: the column stays empty
        return {}
    want = set(peers)
    out = {}
    for c in conns:
        if not c.raddr or c.raddr.ip not in want or c.raddr.ip in out:
            continue
        who = ""
        if c.pid:
            try:
                who = f" {c.pid}/{psutil.Process(c.pid).name()}"
            except Exception:
                who = f" {c.pid}"
        out[c.raddr.ip] = render.endpoint(c.laddr.ip, c.laddr.port) + who
    return out


def _snapshot(groups, by, when, interval, rung, knobs, invalid_delta, lost, overflow,
              invalid_since_start=None) -> dict:
    return {"schema": SCHEMA_VERSION, "type": RECORD_TOP, "time": when, "interval": interval,
            "by": by, "rung": rung, "lost": lost, "map_overflow": overflow,
            "conntrack_invalid_delta": invalid_delta,
            "conntrack_invalid_since_start": invalid_since_start,
            "sysctls": {str(k): v for k, v in knobs.items()},
            "groups": [{"key": list(g.key), "label": g.label, "packets": g.packets,
                        "invalid": g.invalid, "bytes": g.bytes, "rate": round(g.rate, 3),
                        "total_rate": round(g.total_rate, 3), "first_seen": g.first_seen,
                        "last_seen": g.last_seen, "netns": sorted(g.netns),
                        "peers": sorted(g.peers),
                        "reasons": [{"reason": r, "verdict": v, "packets": k}
                                    for (r, v), k in g.reasons.most_common()]}
                       for g in groups]}


def _screen_rows(extra_lines: int) -> int:
    lines = shutil.get_terminal_size((120, 40)).lines
    return max(lines - extra_lines, 5)


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              metavar="S", help="Seconds between refreshes.")
@click.option("--by", type=click.Choice(GROUPINGS), default="peer", show_default=True,
              help="Group rows by sender, sender->local pair, local port, netns or reason.")
@click.option("--json", "as_json", is_flag=True, help="One NDJSON snapshot per interval.")
@click.option("--from", "from_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="One final table from a recording (no BPF, no root).")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N intervals.")
@_apply_options(_anon_options)
def top(interval, by, as_json, from_path, count, anonymize, anonymize_keep_prefix):
    """Who sends the segments conntrack rejects, why, and how fast (counted in the kernel)."""
    anon = make_anonymizer(anonymize, anonymize_keep_prefix)
    if from_path:
        return _top_replay(from_path, by, as_json, anon)
    mod = load_probe()
    require_root("top")
    plan = _plan_and_warn(mod)
    nsmap = sysctl.netns_map()
    own = sysctl.own_netns_inode()
    names = _short_names(nsmap, own)
    tty = stdout_is_tty() and not as_json
    knob_cache: dict = {}
    stats = StatTracker(nsmap, own)
    probe = mod.Probe(plan, aggregate=True, events=False)
    stats.scan()                           # baselines, so the first refresh shows a delta
    state = {"prev": None, "last": time.time(), "n": 0}

    def refresh() -> None:
        """Read the in-kernel counts once and show them (one table or one NDJSON snapshot)."""
        now = time.time()
        rows = from_probe_rows(probe.read_aggregates())
        if anon:
            rows = [_anon_row(anon, r) for r in rows]
        groups = group_rows(rows, by)
        ordered = with_rates(groups, state["prev"], now - state["last"])
        state["prev"], state["last"] = groups, now
        seen_ns = sorted({r.netns for r in rows} | ({own} if own else set()))
        inv_delta = stats.delta(seen_ns)        # also refreshes stats.nsmap for new namespaces
        knobs = _merge_probe_knobs(_knobs_for(seen_ns, knob_cache, stats.nsmap), probe)
        lost, overflow = probe.lost_events(), probe.aggregate_overflow()
        state["n"] += 1
        if as_json:
            click.echo(dumps(_snapshot(ordered, by, now, interval, plan.rung, knobs,
                                       inv_delta, lost, overflow, stats.since_start())))
            return
        header = render.top_header(now, plan.rung, knobs, inv_delta, lost, overflow,
                                   interval, names)
        owners = {} if anon else _owners([g.label for g in ordered[:40]]) \
            if by == "peer" else {}
        adv = run_rules(AdviceInput(rows=rows, sysctls=knobs,
                                    netns_names=_netns_names_json(nsmap), own_netns=own,
                                    kernel=os.uname().release))
        advice_lines = render.advice_text(adv, verbose=False).splitlines() if adv else []
        limit = _screen_rows(header.count("\n") + 4 + len(advice_lines)) if tty else 20
        body = render.top_table(ordered, by, now, owners, limit=limit) if ordered \
            else "(no INVALID or ignored segments yet)"
        screen = header + "\n\n" + body + ("\n\n" + "\n".join(advice_lines)
                                           if advice_lines else "")
        if tty:
            click.echo("\033[H\033[2J" + screen, color=True)   # keep the escape codes
        else:
            click.echo(screen + "\n")

    attached = False
    with stop_on_signals():
        try:
            probe.start()
            attached = True
            # Always on stderr (even with --json): scripts wait for it to know probes are live.
            click.echo(f"Counting conntrack INVALID/ignored TCP segments (rung {plan.rung}), "
                       f"output every {interval:g} s. Hit Ctrl-C to end.", err=True)
            while count is None or state["n"] < count:
                time.sleep(interval)
                refresh()
        except KeyboardInterrupt:
            # Ctrl-C between refreshes: the totals since the last one are shown, not lost.
            if attached:
                refresh()
        finally:
            probe.close()


def _anon_row(anon, row):
    row.peer = anon.address(row.peer)
    if row.local:
        row.local = anon.scrub(row.local)
    return row


class StatTracker:
    """conntrack's own invalid counter (summed over CPUs), per network namespace.

    Namespaces are told apart by inode *and* name (or lowest pid): the kernel recycles
    netns inode numbers quickly, so a namespace deleted during a capture and a new one
    created after it can share an inode.  The first scan takes every namespace's counters
    as its baseline; a namespace that shows up later (created since, or an inode recycled
    for a new one) starts from zero: everything it counted happened while we watched.
    """

    def __init__(self, nsmap, own):
        self.nsmap, self.own = nsmap, own
        self.first: dict = {}       # identity -> counters at its baseline
        self.prev: dict = {}        # identity -> counters at the last read
        self.scanned = False

    def _ident(self, ino):
        if ino == self.own:
            return (ino, "self")
        entry = self.nsmap.get(ino) or {}
        if entry.get("names"):
            return (ino, tuple(entry["names"]))
        if entry.get("pids"):
            return (ino, min(entry["pids"]))
        return (ino, None)

    def _read(self, ino):
        return sysctl.read_conntrack_stat_of(ino, self.nsmap)

    def scan(self) -> None:
        """Note every namespace visible now (see the class docstring for baselines)."""
        self.nsmap = sysctl.netns_map()
        for ino in list(self.nsmap) + ([self.own] if self.own else []):
            ident = self._ident(ino)
            if ident in self.first:
                continue
            cur = self._read(ino)
            if cur is None:
                continue        # conntrack not loaded there (yet): a later scan starts it at zero
            base = cur if not self.scanned else {k: 0 for k in cur}
            self.first[ident] = self.prev[ident] = base
        self.scanned = True

    def delta(self, inodes) -> Optional[int]:
        """Invalid count since the previous call, summed over these namespaces."""
        self.scan()
        total, known = 0, False
        for ino in inodes:
            ident = self._ident(ino)
            cur = self._read(ino)
            if cur is None or ident not in self.prev:
                continue
            total += cur.get("invalid", 0) - self.prev[ident].get("invalid", 0)
            self.prev[ident] = cur
            known = True
        return total if known else None

    def since_start(self) -> Optional[int]:
        if not self.first:
            return None
        return sum(self.prev[i].get("invalid", 0) - self.first[i].get("invalid", 0) for i in self.prev)

    def capture_delta(self, inodes) -> dict:
        """Every counter's change since each namespace's baseline, summed over `inodes`."""
        self.scan()
        out: dict = {}
        for ino in inodes:
            ident = self._ident(ino)
            cur = self._read(ino)
            if cur is None or ident not in self.first:
                continue
            for k, v in (sysctl.stat_delta(self.first[ident], cur) or {}).items():
                out[k] = out.get(k, 0) + v
        return out


def _top_replay(path, by, as_json, anon):
    rec = read_replay(path)
    cap = capture_from_recording(rec, anon)
    rows = cap.all_rows()
    groups = group_rows(rows, by)
    span = recording_span(rows, cap.events)
    ordered = with_rates(groups, None, span)
    meta = cap.meta
    knobs = {int(k): v for k, v in (cap.sysctls or {}).items()}
    rung = meta.get("rung") or (meta.get("host") or {}).get("rung") or "?"
    now = max([g.last_seen for g in ordered] + [cap.end or 0.0])
    if as_json:
        click.echo(dumps(_snapshot(ordered, by, now, span, rung, knobs,
                                   (cap.stat_delta or {}).get("invalid"), rec.lost, 0)))
        return
    names = _short_names({int(k): v for k, v in (meta.get("netns_names") or {}).items()},
                         meta.get("own_netns"))
    click.echo(render.top_header(now, rung, knobs, (cap.stat_delta or {}).get("invalid"),
                                 rec.lost, 0, span, names,
                                 source=f"replay of {os.path.basename(path)}, "
                                        f"{span:.0f} s recorded, rates are averages"))
    click.echo("")
    click.echo(render.top_table(ordered, by, now, absolute=True) if ordered
               else "(no events in the recording)")
    adv = run_rules(AdviceInput(events=cap.events, rows=rows, sysctls=knobs,
                                netns_names=meta.get("netns_names") or {},
                                own_netns=meta.get("own_netns"),
                                kernel=(meta.get("host") or {}).get("kernel")))
    if adv:
        click.echo("")
        click.echo(render.advice_text(adv, verbose=False).rstrip())


# ---- advise -------------------------------------------------------------------------------

@cli.command()
@click.option("--from", "from_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Advise from a recording (no BPF, no root).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, metavar="S", help="Live: seconds to watch before advising.")
@click.option("--apply", "apply_rule", type=click.Choice(sorted(APPLY)),
              help="Apply this rule's sysctl remedy (needs --netns). Nothing else ever writes.")
@click.option("--netns", "netns_spec", metavar="NAME|PID|PATH",
              help="With --apply: the namespace to change (ip netns name, a PID in it, or a "
                   "path like /proc/PID/ns/net; the host is PID 1).")
@click.option("--json", "as_json", is_flag=True, help="Advice as JSON.")
@_apply_options(_anon_options)
def advise(from_path, duration, apply_rule, netns_spec, as_json, anonymize,
           anonymize_keep_prefix):
    """Remedies with their evidence: from a recording, a short live watch, or --apply one."""
    if apply_rule:
        if not netns_spec:
            raise click.UsageError("--apply needs --netns NAME|PID|PATH: conntrace changes only "
                                   "the namespace you name (the host is --netns 1)")
        return _apply(apply_rule, netns_spec)
    if netns_spec:
        raise click.UsageError("--netns is only used with --apply")
    anon = make_anonymizer(anonymize, anonymize_keep_prefix)
    if from_path:
        rec = read_replay(from_path)
        cap = capture_from_recording(rec, anon)
    else:
        cap = _live_capture("advise", duration, max_events=10_000, quiet=as_json)
        if anon:
            cap = _anon_capture(cap, anon)
    meta = cap.meta
    adv = run_rules(AdviceInput(events=cap.events, rows=cap.all_rows(), sysctls=cap.sysctls,
                                netns_names=meta.get("netns_names") or {},
                                own_netns=meta.get("own_netns"),
                                kernel=(meta.get("host") or {}).get("kernel")))
    if as_json:
        click.echo(json.dumps([a.to_dict() for a in adv], indent=2))
        return
    total = sum(r.packets for r in cap.all_rows())
    click.echo(f"{render.fmt_int(total)} segments analysed ({cap.source}).")
    if not adv:
        click.echo("No advice: nothing was rejected or ignored.")
        return
    click.echo("")
    click.echo(render.advice_text(adv).rstrip())


def _apply(rule, netns_spec):
    knob, value = APPLY[rule]
    ref = sysctl.resolve_netns(netns_spec)
    previous, undo = sysctl.apply_sysctl(ref, knob, value)
    where = "the host namespace" if ref.is_self else f"netns {ref.label()} ({ref.inode})"
    click.echo(f"{where}: {sysctl.full_name(knob)} {previous} -> {value}")
    click.echo(f"undo: {undo}")
    if previous == value:
        click.echo("(it already had that value; nothing changed)")


# ---- report -------------------------------------------------------------------------------

def _live_capture(command, duration, max_events, quiet=False) -> Capture:
    """Capture with aggregates and events for `duration` s (Ctrl-C ends early)."""
    mod = load_probe()
    require_root(command)
    plan = _plan_and_warn(mod)
    nsmap = sysctl.netns_map()
    own = sysctl.own_netns_inode()
    stats = StatTracker(nsmap, own)
    budget = EventBudget(max_events)
    probe = mod.Probe(plan, aggregate=True, events=True)
    start = time.time()
    rows = []
    lost = 0
    with stop_on_signals():
        try:
            probe.start()
            start = time.time()     # the capture lasts `duration` from attach, not from the compile
            stats.scan()            # every namespace's counters as they are now
            scanned = start
            if not quiet:
                click.echo(f"Capturing for {duration:g} s (rung {plan.rung})... Ctrl-C ends "
                           "early and still writes.", err=True)
            while time.time() - start < duration:
                for ev in probe.poll(timeout_ms=100):
                    budget.add(ev)
                if time.time() - scanned >= 1.0:
                    stats.scan()    # namespaces created meanwhile start from zero
                    scanned = time.time()
        except KeyboardInterrupt:
            pass
        finally:
            try:
                rows = from_probe_rows(probe.read_aggregates())
                probe.discard_backlog()     # not decoded: the kernel's rows still count them
                lost = probe.lost_events()
            except Exception:
                pass
            probe.close()
    end = time.time()
    involved = sorted({r.netns for r in rows} | {e.netns for e in budget.kept}
                      | ({own} if own else set()))
    stat_delta = stats.capture_delta(involved)   # rescans: names as they are now
    nsmap = stats.nsmap
    refs = {ino: (None if ino == own else sysctl.ref_for_inode(ino, nsmap)) for ino in involved}
    refs = {k: v for k, v in refs.items() if k == own or v is not None}
    ruleset, notes = collect_ruleset(refs)
    sysctls = _merge_probe_knobs(_knobs_for(involved, {}, nsmap), probe)
    omitted = budget.omitted_records() + _unseen(rows, budget)
    meta = {"host": host_facts(plan), "rung": plan.rung, "own_netns": own,
            "netns_names": _netns_names_json(nsmap)}
    return Capture(events=budget.kept, omitted=omitted, lost=lost, start=start, end=end, meta=meta,
                   sysctls={str(k): v for k, v in sysctls.items()}, stat_delta=stat_delta or None,
                   ruleset=ruleset, ruleset_notes=notes, source="live")


def _unseen(rows, budget) -> list:
    """Counts the kernel map has but no event reached us for (lost): keep totals exact."""
    seen: dict = {}
    for e in budget.kept:
        k = (e.netns, e.saddr, e.reason, e.verdict)
        seen[k] = seen.get(k, 0) + 1
    for o in budget.omitted_records():
        k = (o["netns"], o["peer"], o["reason"], o["verdict"])
        seen[k] = seen.get(k, 0) + o["count"]
    out = []
    merged: dict = {}
    for r in rows:
        k = (r.netns, r.peer, r.reason, r.verdict)
        merged[k] = merged.get(k, 0) + r.packets
    for k, n in merged.items():
        extra = n - seen.get(k, 0)
        if extra > 0:
            out.append({"netns": k[0], "peer": k[1], "reason": k[2], "verdict": k[3],
                        "count": extra, "bytes": 0, "unseen": True})
    return out


def _anon_capture(cap: Capture, anon) -> Capture:
    cap.events = [anon.event(e) for e in cap.events]
    cap.omitted = [anon.record(o) for o in cap.omitted]
    cap.meta = anon.record(cap.meta)
    cap.ruleset = anon.record(cap.ruleset)
    cap.ruleset_notes = anon.record(cap.ruleset_notes)
    return cap


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, metavar="S", help="Seconds to capture (Ctrl-C ends early).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory for report.md, report.json, events.ndjson "
                   "(default ./conntrace-report-DATE-TIME).")
@click.option("--from", "from_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Build the report from a recording (no BPF, no root).")
@click.option("--max-events", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Events written in full; beyond this, samples per peer and reason.")
@_apply_options(_anon_options)
def report(duration, out_dir, from_path, max_events, anonymize, anonymize_keep_prefix):
    """Write a bug-report bundle: report.md, report.json and events.ndjson."""
    anon = make_anonymizer(anonymize, anonymize_keep_prefix)
    out_dir = out_dir or time.strftime("conntrace-report-%Y%m%d-%H%M%S")
    if from_path:
        rec = read_replay(from_path)
        cap = capture_from_recording(rec, None, max_events=max_events)
    else:
        cap = _live_capture("report", duration, max_events)
    try:
        rep = write_bundle(out_dir, cap, anon)
    except OSError as e:
        raise Fail(f"{out_dir}: cannot write the report: {e.strerror or e}") from None
    c = rep["capture"]
    click.echo(f"{out_dir}/report.md, report.json, events.ndjson written: "
               f"{render.fmt_int(c['events_total'])} segments, {len(rep['peers'])} peer x reason "
               f"rows, {len(rep['advice'])} advice" + (", anonymized" if anon else "") + ".")


# ---- doctor -------------------------------------------------------------------------------

@cli.command()
def doctor():
    """Check that `conntrace trace` can run here, and say how to fix what is missing."""
    try:
        from .doctor import run_doctor
    except ImportError as e:
        raise Fail(f"doctor is not available in this build ({e})") from None
    sys.exit(run_doctor(out=click.echo))


def main():
    cli(prog_name="conntrace")


if __name__ == "__main__":
    main()
