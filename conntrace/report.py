"""The bug-report bundle: report.md for people, report.json for tools, events.ndjson to replay.

Capture (cli.py) hands over a Capture; build_report() turns it into one dict and
markdown() renders that dict, so a replayed events.ndjson produces the same report.
"""
from __future__ import annotations

import os
import platform
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from tabulate import tabulate

from . import __version__
from .advise import AdviceInput, advise
from .aggregate import peer_reason_table, rows_from_events, totals_by_verdict
from .events import SCHEMA_VERSION, REASONS, Event
from .ndjson import Recording, Writer
from .render import endpoint, explain, fmt_datetime, fmt_int, window_side_cell

DEFAULT_MAX_EVENTS = 10_000
SAMPLES_PER_KEY = 3          # kept per (peer, reason) once the budget is spent
STAT_SHOWN = ("invalid", "ignore", "drop", "insert_failed", "early_drop")
KNOB_COLUMNS = (("be_liberal", "nf_conntrack_tcp_be_liberal"), ("loose", "nf_conntrack_tcp_loose"),
                ("ignore_invalid_rst", "nf_conntrack_tcp_ignore_invalid_rst"),
                ("log_invalid", "nf_conntrack_log_invalid"), ("checksum", "nf_conntrack_checksum"),
                ("count", "nf_conntrack_count"), ("max", "nf_conntrack_max"))


class EventBudget:
    """Keep every event up to max_events, then a few samples per (peer, reason), counting the rest."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, per_key: int = SAMPLES_PER_KEY):
        self.max_events = max_events
        self.per_key = per_key
        self.kept: list = []
        self.per_key_kept: Counter = Counter()
        self.omitted: dict = {}     # (netns, peer, reason, verdict) -> [count, bytes, first, last]
        self.total = 0

    # Memory stays bounded under a flood from many senders: samples are taken for at most
    # MAX_SAMPLE_KEYS (peer, reason) pairs, and left-out counts are kept per peer for at most
    # MAX_OMITTED_KEYS peers; beyond that they are counted under the peer "?".
    MAX_SAMPLE_KEYS = 5000
    MAX_OMITTED_KEYS = 20000

    def add(self, ev: Event) -> bool:
        self.total += 1
        key = (ev.saddr, ev.reason)
        if len(self.kept) < self.max_events or (
                self.per_key_kept[key] < self.per_key
                and (key in self.per_key_kept or len(self.per_key_kept) < self.MAX_SAMPLE_KEYS)):
            self.kept.append(ev)
            self.per_key_kept[key] += 1
            return True
        k = (ev.netns, ev.saddr, ev.reason, ev.verdict)
        if k not in self.omitted and len(self.omitted) >= self.MAX_OMITTED_KEYS:
            k = (ev.netns, "?", ev.reason, ev.verdict)
        m = self.omitted.setdefault(k, [0, 0, ev.time, ev.time])
        m[0] += 1
        m[1] += ev.payload
        m[2] = min(m[2], ev.time)
        m[3] = max(m[3], ev.time)
        return False

    def omitted_records(self) -> list:
        return [{"netns": k[0], "peer": k[1], "reason": k[2], "verdict": k[3], "count": v[0],
                 "bytes": v[1], "first_seen": v[2], "last_seen": v[3]}
                for k, v in sorted(self.omitted.items(), key=lambda kv: -kv[1][0])]

    @property
    def omitted_count(self) -> int:
        return sum(v[0] for v in self.omitted.values())


@dataclass
class Capture:
    """Everything a report needs, whether it came from the probe or from a recording."""
    events: list                                   # kept events
    omitted: list = field(default_factory=list)    # omitted records (dicts)
    rows: Optional[list] = None                    # exact counts (probe map), else from events
    lost: int = 0
    start: float = 0.0
    end: float = 0.0
    meta: dict = field(default_factory=dict)       # host facts, rung, own_netns, netns_names
    sysctls: dict = field(default_factory=dict)    # inode -> knobs
    stat_delta: Optional[dict] = None
    ruleset: list = field(default_factory=list)    # {"netns","tool","context","line"}
    ruleset_notes: list = field(default_factory=list)
    source: str = "live"
    skipped_lines: int = 0

    def all_rows(self) -> list:
        if self.rows:
            return self.rows
        return rows_from_events(self.events, self.omitted)


# ---- facts about the host -------------------------------------------------------------

def distribution(os_release: str = "/etc/os-release") -> str:
    try:
        with open(os_release) as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "unknown"


def bcc_version() -> str:
    try:
        from importlib import metadata
        return metadata.version("bcc")
    except Exception:
        pass
    try:
        # bccfind also finds the distro's python3-bpfcc from a venv or another Python
        from .bccfind import import_bcc
        bcc = import_bcc()
        return getattr(bcc, "__version__", "installed (version unknown)")
    except Exception:
        return "not found"


def host_facts(plan=None) -> dict:
    u = os.uname()
    facts = {"kernel": u.release, "kernel_version": u.version, "machine": u.machine,
             "distribution": distribution(), "bcc": bcc_version(), "conntrace": __version__,
             "python": platform.python_version(), "hostname": u.nodename}
    if plan is not None:
        facts["rung"] = getattr(plan, "rung", None)
        facts["probes"] = list(getattr(plan, "probes", []) or [])
        facts["missing"] = list(getattr(plan, "missing", []) or [])
        facts["abi"] = dict(getattr(plan, "abi", {}) or {})
    return facts


_INVALID_RE = re.compile(r"invalid", re.IGNORECASE)


def filter_ruleset(text: str, tool: str) -> list:
    """Lines mentioning INVALID, with the table/chain they sit in."""
    out = []
    table = chain = ""
    for raw in text.splitlines():
        line = raw.strip()
        if tool == "nft":
            m = re.match(r"table (\S+ \S+)", line)
            if m:
                table, chain = m.group(1), ""
            m = re.match(r"chain (\S+)", line)
            if m:
                chain = m.group(1)
        else:
            if line.startswith("*"):
                table = line[1:]
        if _INVALID_RE.search(line) and not line.startswith("#"):
            ctx = f"{table} {chain}".strip()
            out.append({"tool": tool, "context": ctx, "line": line})
    return out


def collect_ruleset(refs: dict) -> tuple:
    """refs: inode -> NetnsRef or None (host). Returns (lines, notes); missing tools are notes."""
    from .sysctl import run_tool
    lines, notes = [], []
    for inode, ref in refs.items():
        for argv, tool in ((["iptables-save", "-c"], "iptables"), (["ip6tables-save", "-c"], "ip6tables"),
                           (["nft", "list", "ruleset"], "nft")):
            ok, out = run_tool(argv, ref)
            if not ok:
                notes.append(f"netns {inode}: {out}")
                continue
            for item in filter_ruleset(out, tool):
                item["netns"] = inode
                lines.append(item)
    return lines, notes


# ---- building -------------------------------------------------------------------------

def samples_per_reason(events: list) -> list:
    """The first event of each reason (invalid verdicts first), in reason order of REASONS."""
    best: dict = {}
    for ev in events:
        cur = best.get(ev.reason)
        if cur is None or (cur.verdict != "invalid" and ev.verdict == "invalid"):
            best[ev.reason] = ev
    order = list(REASONS)
    return [best[r] for r in sorted(best, key=order.index)]


def build_report(cap: Capture) -> dict:
    rows = cap.all_rows()
    verdicts = totals_by_verdict(rows)
    own = cap.meta.get("own_netns")
    names = {int(k): v for k, v in (cap.meta.get("netns_names") or {}).items()}
    involved = sorted({r.netns for r in rows})
    sysctls = {int(k): v for k, v in (cap.sysctls or {}).items()}
    inp = AdviceInput(events=cap.events, rows=rows, sysctls=sysctls, netns_names=names,
                      own_netns=own, kernel=(cap.meta.get("host") or {}).get("kernel"))
    adv = advise(inp)
    netns_info = {}
    for ino in sorted(set(involved) | set(sysctls)):
        entry = names.get(ino) or {}
        netns_info[str(ino)] = {"label": inp.netns_label(ino), "names": entry.get("names", []),
                                "pids": entry.get("pids", []), "sysctls": sysctls.get(ino, {})}
    total = sum(verdicts.values())
    return {
        "schema": SCHEMA_VERSION, "type": "report", "conntrace": __version__,
        "capture": {"source": cap.source, "start": cap.start, "end": cap.end,
                    "duration": round(max(cap.end - cap.start, 0.0), 3),
                    "events_total": total, "events_written": len(cap.events),
                    "events_omitted": sum(o["count"] for o in cap.omitted), "lost": cap.lost,
                    "by_verdict": dict(verdicts), "skipped_lines": cap.skipped_lines},
        "host": cap.meta.get("host") or {},
        "own_netns": own,
        "netns": netns_info,
        "conntrack_stat_delta": cap.stat_delta,
        "ruleset": cap.ruleset,
        "ruleset_notes": cap.ruleset_notes,
        "peers": [{"netns": n, "peer": p, "reason": r, "verdict": v, "packets": k, "bytes": b,
                   "first_seen": f, "last_seen": l}
                  for (n, p, r, v, k, b, f, l) in peer_reason_table(rows)],
        "samples": [{"reason": ev.reason, "explanation": explain(ev), "event": ev.to_dict()}
                    for ev in samples_per_reason(cap.events)],
        "advice": [a.to_dict() for a in adv],
    }


# ---- markdown -------------------------------------------------------------------------

def _md_table(rows, headers, align=None) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=align)


def markdown(rep: dict) -> str:
    c = rep["capture"]
    h = rep.get("host") or {}
    out = ["# conntrace report", ""]
    when = (f"{fmt_datetime(c['start'])} to {fmt_datetime(c['end'])} ({c['duration']:.0f} s)"
            if c.get("start") else "unknown time")
    out.append(f"Captured {when}, source: {c['source']}.")
    verdicts = ", ".join(f"{fmt_int(k, ' ')} {v}" for v, k in sorted(c["by_verdict"].items()))
    out.append(f"Segments counted: {fmt_int(c['events_total'], ' ')} ({verdicts or 'none'}); "
               f"events in events.ndjson: {fmt_int(c['events_written'], ' ')}, left out by the "
               f"event budget: {fmt_int(c['events_omitted'], ' ')} (counted in every table), "
               f"lost between kernel and user space: {fmt_int(c['lost'], ' ')}.")
    if c.get("skipped_lines"):
        out.append(f"Replay skipped {c['skipped_lines']} unreadable line(s) of the recording.")
    out += ["", "## Host", ""]
    facts = [("kernel", h.get("kernel", "?")), ("ABI rung", h.get("rung") or "?"),
             ("distribution", h.get("distribution", "?")), ("bcc", h.get("bcc", "?")),
             ("conntrace", h.get("conntrace", rep.get("conntrace"))),
             ("python", h.get("python", "?"))]
    if h.get("hostname"):
        facts.insert(0, ("hostname", h["hostname"]))
    if h.get("missing"):
        facts.append(("probes missing", ", ".join(h["missing"])))
    out.append(_md_table(facts, ["fact", "value"]))

    out += ["", "## Conntrack settings per network namespace", ""]
    ns_rows = []
    for ino, info in rep["netns"].items():
        k = info.get("sysctls") or {}
        ns_rows.append([info["label"]] + ["?" if k.get(full) is None else str(k[full])
                                          for _, full in KNOB_COLUMNS])
    if ns_rows:
        out.append(_md_table(ns_rows, ["netns"] + [short for short, _ in KNOB_COLUMNS]))
        out.append("")
        out.append("`?`: not readable (namespace gone, no root, nf_conntrack not loaded there, "
                   "or the kernel lacks the knob).")
    else:
        out.append("No namespace involved.")

    out += ["", "## Conntrack counters during the capture", ""]
    delta = rep.get("conntrack_stat_delta")
    if delta:
        out.append(_md_table([[k, fmt_int(delta.get(k, 0), " ")] for k in STAT_SHOWN],
                             ["counter (/proc/net/stat/nf_conntrack, all CPUs)", "delta"],
                             ("left", "right")))
        inv = delta.get("invalid", 0)
        counted = c["by_verdict"].get("invalid", 0)
        if inv != counted:
            out.append("")
            out.append(f"conntrack's invalid counter moved by {fmt_int(inv, ' ')} while conntrace "
                       f"counted {fmt_int(counted, ' ')} INVALID TCP segments: the counter also "
                       "counts other protocols, packets without conntrack and other namespaces.")
    else:
        out.append("Not available (replayed recording without counters, or "
                   "/proc/net/stat/nf_conntrack unreadable).")

    out += ["", "## Ruleset lines matching INVALID", ""]
    if rep["ruleset"]:
        out.append("```")
        for item in rep["ruleset"]:
            out.append(f"[netns {item.get('netns', '?')} {item['tool']} {item['context']}] "
                       f"{item['line']}")
        out.append("```")
    else:
        out.append("None found.")
    for note in rep.get("ruleset_notes") or []:
        out.append(f"- {note}")

    out += ["", "## Peers and reasons", ""]
    if rep["peers"]:
        prow = [[str(p["netns"]), p["peer"], p["reason"], p["verdict"], fmt_int(p["packets"], " "),
                 fmt_datetime(p["first_seen"]) if p["first_seen"] else "-",
                 fmt_datetime(p["last_seen"]) if p["last_seen"] else "-"]
                for p in rep["peers"][:50]]
        out.append(_md_table(prow, ["netns", "peer (sender)", "reason", "verdict", "packets",
                                    "first seen", "last seen"],
                             ("left", "left", "left", "left", "right", "left", "left")))
        if len(rep["peers"]) > 50:
            out.append(f"\n... {len(rep['peers']) - 50} more rows in report.json")
    else:
        out.append("No segment was rejected or ignored during the capture.")

    out += ["", "## One sample per reason", ""]
    for s in rep["samples"]:
        ev = Event.from_dict(s["event"])
        out.append(f"### {s['reason']} ({ev.verdict})")
        out.append("")
        out.append(s["explanation"])
        out.append("")
        out.append(f"- kernel: `{ev.message}`")
        out.append(f"- {endpoint(ev.saddr, ev.sport)} -> {endpoint(ev.daddr, ev.dport)}, {ev.dir} direction, "
                   f"netns {ev.netns}, state {ev.ct_state}"
                   + (f", status {'|'.join(ev.ct_status)}" if ev.ct_status else ""))
        if ev.orig.src and (ev.orig.src, ev.orig.dst) != (ev.reply.dst, ev.reply.src):
            out.append(f"- NAT: original {endpoint(ev.orig.src, ev.orig.sport)} -> "
                       f"{endpoint(ev.orig.dst, ev.orig.dport)}, reply "
                       f"{endpoint(ev.reply.src, ev.reply.sport)} -> "
                       f"{endpoint(ev.reply.dst, ev.reply.dport)}")
        out.append(f"- segment: flags {ev.flags or '-'} seq {ev.seq} ack {ev.ack} sack "
                   f"{ev.sack if ev.sack is not None else '-'} win {ev.win} (scaled "
                   f"{ev.win_scaled}) payload {ev.payload}; bound "
                   f"{'-' if ev.bound is None else ev.bound}, off by "
                   f"{'-' if ev.distance is None else ev.distance}")
        out.append(f"- original side: {window_side_cell(ev.seen[0])}")
        out.append(f"- reply side: {window_side_cell(ev.seen[1])}")
        out.append("")
    if not rep["samples"]:
        out.append("No events.")

    out += ["", "## Advice", ""]
    if not rep["advice"]:
        out.append("No advice: nothing to act on.")
    for a in rep["advice"]:
        out.append(f"### {a['title']}")
        out.append("")
        out.append(f"Confidence: {a['confidence']} (rule `{a['rule']}`)")
        out.append("")
        for e in a["evidence"]:
            out.append(f"- evidence: {e}")
        for x in a["actions"]:
            out.append(f"- do: `{x}`" if _is_command(x) else f"- do: {x}")
        for p in a["persist"]:
            out.append(f"- persist: `{p}`" if _is_command(p) else f"- persist: {p}")
        for t in a["tradeoffs"]:
            out.append(f"- trade-off: {t}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _is_command(s: str) -> bool:
    from .render import is_command
    return is_command(s)


# ---- writing --------------------------------------------------------------------------

def write_bundle(out_dir: str, cap: Capture, anonymizer=None) -> dict:
    """Write report.md, report.json, events.ndjson into out_dir; returns the report dict."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    rep = build_report(cap)
    if anonymizer is not None:
        rep = anonymizer.record(rep)
    md = markdown(rep)
    if anonymizer is not None:
        md = anonymizer.scrub(md)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(rep, fh, indent=2)
        fh.write("\n")
    write_events(os.path.join(out_dir, "events.ndjson"), cap, anonymizer)
    return rep


def write_events(path: str, cap: Capture, anonymizer=None):
    with Writer(path, anonymizer=anonymizer) as w:
        w.meta(**{**cap.meta, "started": cap.start,
                  "anonymized": anonymizer is not None or bool(cap.meta.get("anonymized"))})
        for ev in cap.events:
            w.event(ev)
        for om in cap.omitted:
            w.omitted(om["netns"], om["peer"], om["reason"], om["verdict"], om["count"],
                      om.get("bytes", 0) or 0, om.get("first_seen"), om.get("last_seen"))
        if cap.lost:
            w.lost(cap.lost, cap.end)
        w.summary(ended=cap.end, events=len(cap.events),
                  omitted=sum(o["count"] for o in cap.omitted), lost=cap.lost,
                  sysctls={str(k): v for k, v in cap.sysctls.items()},
                  stat_delta=cap.stat_delta, ruleset=cap.ruleset, ruleset_notes=cap.ruleset_notes)


def capture_from_recording(rec: Recording, anonymizer=None, max_events: Optional[int] = None) -> Capture:
    """A Capture rebuilt from a recording, so a replayed report equals the live one."""
    events = rec.events
    omitted = list(rec.omitted)
    meta = dict(rec.meta or {})
    meta.pop("schema", None)
    meta.pop("type", None)
    summary = rec.summary or {}
    if anonymizer is not None:
        events = [anonymizer.event(e) for e in events]
        omitted = [anonymizer.record(o) for o in omitted]
        meta = anonymizer.record(meta)
        summary = anonymizer.record(summary)
    if max_events is not None:
        budget = EventBudget(max_events)
        for ev in events:
            budget.add(ev)
        events = budget.kept
        omitted += budget.omitted_records()
    times = [e.time for e in events] + [o.get("first_seen") or 0 for o in omitted]
    times = [t for t in times if t]
    start = meta.get("started") or (min(times) if times else 0.0)
    end = summary.get("ended") or (max(times) if times else start)
    sysctls = dict(meta.get("sysctls") or {})
    sysctls.update(summary.get("sysctls") or {})
    return Capture(events=events, omitted=omitted, lost=rec.lost, start=start, end=end, meta=meta,
                   sysctls=sysctls, stat_delta=summary.get("stat_delta"),
                   ruleset=summary.get("ruleset") or [],
                   ruleset_notes=summary.get("ruleset_notes") or [],
                   source=f"replay of {os.path.basename(rec.path)}", skipped_lines=rec.skipped)
