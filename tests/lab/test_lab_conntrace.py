"""conntrace against the kernel's own verdicts, on every kernel class (one guest run each).

The oracle is the kernel: its `nf_ct_proto_6:` log lines, the conntrack invalid counter and
the `ct state invalid` drop counter, recorded by the scenario library while conntrace ran.
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .conftest import CHECKOUT
from .scenarios import ALL_SCENARIOS, WINDOW_SCENARIOS

pytestmark = pytest.mark.lab


def _steps_ok(suite, *names):
    steps = suite.json("steps.json")
    for name in names:
        assert name in steps, f"{suite.klass}: step {name} did not run: {steps}"
        assert steps[name]["ok"], f"{suite.klass}: step {name} failed: {steps[name].get('traceback')}"


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _events(suite) -> list[dict]:
    return [r for r in _records(suite.dir / "trace.ndjson") if r.get("type", "event") == "event"]


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _flow_events(events: list[dict], scenario: dict) -> list[dict]:
    """conntrace's events for the scenario's injected segment: same flow, same sequence
    number, during the scenario (the connection's own teardown RST comes after and differs)."""
    seg = scenario["segment"]
    return [e for e in events
            if scenario["start"] - 0.05 <= e["time"] <= scenario["end"] + 1.0
            and e["sport"] == seg["sport"] and e["dport"] == seg["dport"] and e["seq"] == seg["seq"]
            and _same(e["saddr"], seg["src"]) and _same(e["daddr"], seg["dst"])]


def _segment_lines(scenario: dict) -> list[dict]:
    """The kernel's log lines for the injected segment (by its SEQ when the line shows it)."""
    seq = str(scenario["segment"]["seq"])
    return [line for line in scenario["oracle"]["log"]
            if line.get("fields", {}).get("SEQ", seq) == seq]


# ---------------------------------------------------------------------------------------
# issue 2: the scenario library reproduces every reason and records the kernel's oracle

def test_guest_kernel_has_the_class_abi(suite):
    _steps_ok(suite, "facts")
    facts = suite.json("facts.json")
    abi = {"5.10": (False, False), "6.1-variadic": (True, False), "6.1": (True, True), "6.12": (True, True)}
    assert (facts["has_nf_tcp_log_invalid"], facts["btf_has_invalid_log_struct"]) == abi[suite.klass], facts


def test_every_scenario_matches_the_kernel_oracle(suite):
    doc = suite.json("scenarios.json")
    ids = {r["id"] for r in doc["scenarios"]}
    for liberal in (0, 1):
        for name in ALL_SCENARIOS:
            assert f"{name}/ipv4/liberal={liberal}" in ids
        for name in WINDOW_SCENARIOS:
            assert f"{name}/ipv6/liberal={liberal}" in ids
    bad = [f"{r['id']}: {r['mismatches']}" for r in doc["scenarios"] if not r["ok"]]
    assert not bad, "\n".join(bad)
    # The oracle is real: INVALID verdicts were counted and dropped by the firewall.
    seq_over = next(r for r in doc["scenarios"] if r["id"] == "seq_over/ipv4/liberal=0")
    assert seq_over["oracle"]["invalid_delta"] == 1 and seq_over["oracle"]["dropped"]
    assert seq_over["oracle"]["messages"], "no kernel log line recorded"


# ---------------------------------------------------------------------------------------
# issue 3: conntrace trace pairs one event with each kernel log line

def test_trace_yields_one_event_per_kernel_log_line_with_the_same_reason_verdict_bound(suite):
    _steps_ok(suite, "trace")
    doc = suite.json("scenarios.json")
    events = _events(suite)
    assert events, f"{suite.klass}: trace recorded no events; stderr: {suite.text('trace.err')[-2000:]}"
    variadic = suite.klass == "6.1-variadic"
    problems = []
    for sc in doc["scenarios"]:
        exp, orc = sc["expected"], sc["oracle"]
        got = _flow_events(events, sc)
        if exp["verdict"] == "accepted-liberal":
            # Only the variadic ABI calls the logger before be_liberal's decision.
            want = 1 if variadic else 0
            if len(got) != want or (want and got[0]["verdict"] != "accepted-liberal"):
                problems.append(f"{sc['id']}: want {want} accepted-liberal event, got "
                                f"{[(e['reason'], e['verdict']) for e in got]}")
            continue
        lines = _segment_lines(sc)
        if len(got) != len(lines):
            problems.append(f"{sc['id']}: {len(lines)} kernel line(s) {[x['message'] for x in lines]} but "
                            f"{len(got)} event(s) {[(e['reason'], e['message']) for e in got]}")
            continue
        main = [e for e in got if e["reason"] == exp["reason"]]
        if len(main) != 1:
            problems.append(f"{sc['id']}: expected reason {exp['reason']}, got {[e['reason'] for e in got]}")
            continue
        ev = main[0]
        if ev["verdict"] != exp["verdict"]:
            problems.append(f"{sc['id']}: verdict {ev['verdict']} != kernel's {exp['verdict']}")
        if ev["message"] not in orc["messages"]:
            problems.append(f"{sc['id']}: message {ev['message']!r} not among the kernel's {orc['messages']}")
        printed = [b for b in orc["bounds"] if b is not None]
        if ev["reason"] == "OVERSHOT":
            # The kernel prints how many bytes overshoot the window: conntrace's distance.
            if printed and ev["distance"] not in printed:
                problems.append(f"{sc['id']}: overshoot {ev['distance']} != kernel's {printed}")
        elif printed and ev["bound"] not in printed:
            problems.append(f"{sc['id']}: bound {ev['bound']} != kernel's {printed}")
        if ev["reason"] in {"SEQ_OVER", "ACK_OVER", "SACK_OVER", "SEQ_UNDER", "ACK_UNDER"}:
            if ev["bound"] is None or ev["bound_recomputed"] != ev["bound"]:
                problems.append(f"{sc['id']}: bound {ev['bound']} but recomputed from seen "
                                f"{ev['bound_recomputed']}")
    assert not problems, f"{suite.klass}:\n" + "\n".join(problems)


def test_trace_events_carry_the_window_numbers(suite):
    events = [e for e in _events(suite) if e["reason"] == "SACK_OVER"]
    assert events, "no SACK_OVER event"
    ev = events[0]
    assert ev["sack"] is not None and ev["seen"][0]["td_end"] and ev["seen"][1]["td_maxwin"]
    assert ev["ct_state"] == "ESTABLISHED" and ev["dir"] == "original"
    assert ev["distance"] and ev["distance"] > 0
    assert ev["orig"]["src"] and ev["reply"]["src"]


def test_trace_detaches_on_ctrl_c(suite):
    life = suite.json("trace-lifecycle.json")
    assert life["rc"] == 0, life
    assert life["exit_seconds"] < 30
    ours = [k for k in life["kprobes_during"] if "log_invalid" in k]
    assert ours, f"no conntrack kprobe registered while tracing: {life['kprobes_during']}"
    left = [k for k in life["kprobes_after"] if "log_invalid" in k]
    assert not left, f"probes left behind after Ctrl-C: {left}"


# ---------------------------------------------------------------------------------------
# issue 4: top counts exactly under a flood; middlebox advice; apply

def test_top_counts_a_flood_exactly(suite):
    _steps_ok(suite, "top")
    flood = suite.json("flood.json")
    assert flood["total"] == 100000
    snaps = [r for r in _records(suite.dir / "top.ndjson") if r.get("type") == "top"]
    assert snaps, suite.text("top.err")[-2000:]
    last = snaps[-1]
    assert last["lost"] == 0 and last["map_overflow"] == 0
    per_peer = {g["label"] if g["label"] in flood["injected"] else g["peers"][0]: g["packets"]
                for g in last["groups"]}
    for peer, n in flood["injected"].items():
        assert per_peer.get(peer) == n, f"{peer}: top says {per_peer.get(peer)}, injected {n}"
    assert flood["ct_delta"]["invalid"] == 100000
    assert sum(per_peer.get(p, 0) for p in flood["injected"]) == flood["ct_delta"]["invalid"]


def test_trace_under_a_flood_shows_or_counts_every_segment_and_the_exact_total(suite):
    _steps_ok(suite, "trace")
    flood = suite.json("trace-flood.json")
    assert flood["ct_delta"]["invalid"] == flood["total"]
    recs = _records(suite.dir / "trace.ndjson")
    events = [r for r in recs if r.get("type") == "event"]
    lost = [r for r in recs if r.get("type") == "lost"]
    unseen = [r for r in recs if r.get("type") == "omitted"]
    summaries = [r for r in recs if r.get("type") == "summary"]
    assert summaries, suite.text("trace.err")[-2000:]
    summary = summaries[-1]
    print(f"{suite.klass}: trace, scenarios then a {flood['total']}-segment flood: "
          f"{summary['events']} shown, {summary['lost']} counted lost, kernel total {summary.get('counted')}")
    assert summary["lost"] > 0, "the flood was meant to overrun user space"
    # nothing vanishes: shown + lost is what the kernel counted while trace was attached
    assert summary["events"] == len(events)
    assert sum(r["count"] for r in lost) == summary["lost"]
    assert summary["events"] + summary["lost"] == summary["counted"]
    # and per flood peer, shown + counted-but-unseen is exactly what was injected
    for peer, n in flood["injected"].items():
        shown = sum(1 for e in events if e["saddr"] == peer)
        hidden = sum(r["count"] for r in unseen if r["peer"] == peer)
        assert shown + hidden == n, f"{peer}: {shown} shown + {hidden} unseen != {n} injected"


def test_middlebox_stalls_without_be_liberal_and_completes_with_it(suite):
    _steps_ok(suite, "middlebox")
    mb = suite.json("middlebox.json")
    first = {}
    for t in mb["transfers"]:
        first.setdefault(t["liberal"], t)
    strict, liberal = first[0], first[1]
    print(f"{suite.klass}: transfer of {strict['size'] / 1e6:.0f} MB: be_liberal=0 {strict['seconds']:.1f} s "
          f"({'completed' if strict['completed'] else 'stalled'}), be_liberal=1 {liberal['seconds']:.1f} s "
          f"({'completed' if liberal['completed'] else 'stalled'})")
    assert liberal["completed"], liberal
    assert not strict["completed"] or strict["seconds"] > 3 * liberal["seconds"], (strict, liberal)
    # What stalled it is conntrack: SACK-carrying ACKs marked INVALID and dropped.
    assert strict["oracle"]["invalid_delta"] > 0 and strict["oracle"]["nft_drop_delta"] > 0
    assert liberal["oracle"]["invalid_delta"] == 0


def test_middlebox_top_names_the_peer_with_sack_over_and_advises(suite):
    mb = suite.json("middlebox-watched.json")
    snaps = [r for r in _records(suite.dir / "mbtop.ndjson") if r.get("type") == "top"]
    assert snaps
    peer = mb["topology"]["client"]   # the sender of the SACK-carrying ACKs
    groups = [g for g in snaps[-1]["groups"] if peer in g["peers"] or g["label"] == peer]
    assert groups, f"{peer} not in {[g['label'] for g in snaps[-1]['groups']]}"
    reasons = {r["reason"] for g in groups for r in g["reasons"]}
    assert "SACK_OVER" in reasons, reasons
    report = json.loads((suite.dir / "report" / "report.json").read_text())
    rules = {a["rule"] for a in report["advice"]}
    assert "seq-randomization" in rules, rules
    text = (suite.dir / "report" / "report.md").read_text()
    assert "randomization" in text and "nf_conntrack_tcp_be_liberal" in text


def test_invalid_rst_advises_ignore_invalid_rst_not_be_liberal(suite, tmp_path):
    doc = suite.json("scenarios.json")
    sc = next(r for r in doc["scenarios"] if r["id"] == "invalid_rst/ipv4/liberal=0")
    evs = _flow_events(_events(suite), sc)
    assert evs and all(e["reason"] == "INVALID_RST" for e in evs)
    rec = tmp_path / "rst.ndjson"
    rec.write_text("".join(json.dumps(e) + "\n" for e in evs))
    proc = subprocess.run([sys.executable, "-m", "conntrace", "advise", "--from", str(rec), "--json"],
                          capture_output=True, text=True, cwd=CHECKOUT)
    assert proc.returncode == 0, proc.stderr
    rules = {a["rule"] for a in json.loads(proc.stdout)}
    assert "ignore-invalid-rst" in rules and "be-liberal" not in rules, rules


def test_advise_apply_changes_only_the_named_namespace(suite):
    _steps_ok(suite, "apply")
    ap = suite.json("apply.json")
    assert ap["rc"] == 0, ap["stderr"]
    target, other = ap["target"], next(k for k in ap["before"] if k not in (ap["target"], "init"))
    assert ap["before"][target] == "0" and ap["after"][target] == "1"
    assert ap["after"][other] == ap["before"][other] == "0"
    assert ap["after"]["init"] == ap["before"]["init"]
    assert "0 -> 1" in ap["stdout"] and "undo:" in ap["stdout"]
    assert ap["after_undo"][target] == "0"


# ---------------------------------------------------------------------------------------
# issue 5: the report bundle, replayed and anonymized on this machine

def test_report_bundle_is_filled_from_real_data(suite):
    rep_dir = suite.dir / "report"
    for name in ("report.md", "report.json", "events.ndjson"):
        assert (rep_dir / name).exists(), name
    rep = json.loads((rep_dir / "report.json").read_text())
    assert rep["host"].get("kernel") and rep["host"].get("rung")
    assert rep["netns"] and any(info["sysctls"] for info in rep["netns"].values())
    assert rep["conntrack_stat_delta"] and rep["conntrack_stat_delta"].get("invalid", 0) > 0
    assert rep["ruleset"], "no ruleset line matching invalid"
    assert rep["peers"] and rep["samples"] and rep["advice"]
    assert any(s["reason"] == "SACK_OVER" and "beyond" in s["explanation"] for s in rep["samples"])


def test_report_replay_reproduces_the_peer_table_without_root(suite, tmp_path):
    rep_dir = suite.dir / "report"
    live = json.loads((rep_dir / "report.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "conntrace", "report", "--from", str(rep_dir / "events.ndjson"),
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=CHECKOUT)
    assert proc.returncode == 0, proc.stderr
    replay = json.loads((tmp_path / "report.json").read_text())
    key = lambda p: (p["netns"], p["peer"], p["reason"], p["verdict"], p["packets"])  # noqa: E731
    assert sorted(map(key, replay["peers"])) == sorted(map(key, live["peers"]))


def test_report_anonymized_leaves_no_original_address(suite, tmp_path):
    rep_dir = suite.dir / "report"
    events = [r for r in _records(rep_dir / "events.ndjson") if r.get("type", "event") == "event"]
    addresses = {e[k] for e in events for k in ("saddr", "daddr")}
    addresses |= {e[t][k] for e in events for t in ("orig", "reply") for k in ("src", "dst")}
    assert addresses
    proc = subprocess.run([sys.executable, "-m", "conntrace", "report", "--from", str(rep_dir / "events.ndjson"),
                           "--out", str(tmp_path), "--anonymize"], capture_output=True, text=True, cwd=CHECKOUT)
    assert proc.returncode == 0, proc.stderr
    for f in tmp_path.iterdir():
        text = f.read_text()
        for addr in addresses:
            assert addr not in text, f"{addr} left in {f.name}"
            expanded = ipaddress.ip_address(addr).exploded
            assert expanded not in text, f"{expanded} left in {f.name}"
