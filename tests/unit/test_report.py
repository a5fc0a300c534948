import json
import os

from conntrace.ndjson import read_recording
from conntrace.report import (Capture, EventBudget, build_report, capture_from_recording,
                              filter_ruleset, markdown, samples_per_reason, write_bundle)
from event_factory import make_event, MIDDLEBOX


def fixture_capture(**kw):
    return capture_from_recording(read_recording(MIDDLEBOX), **kw)


def test_report_sections_are_filled_from_the_recording():
    rep = build_report(fixture_capture())
    md = markdown(rep)
    for heading in ("## Host", "## Conntrack settings per network namespace",
                    "## Conntrack counters during the capture", "## Ruleset lines matching INVALID",
                    "## Peers and reasons", "## One sample per reason", "## Advice"):
        assert heading in md
    assert "6.1.0-41-amd64" in md and "deferred" in md and "Debian GNU/Linux 12" in md
    assert "netns web (4026532451)" in md
    assert "--ctstate INVALID -j DROP" in md
    assert rep["conntrack_stat_delta"]["invalid"] == 55
    assert [p["reason"] for p in rep["peers"]] == ["SACK_OVER", "SEQ_UNDER", "INVALID_RST",
                                                  "ACK_UNDER"]
    assert {s["reason"] for s in rep["samples"]} == {"SACK_OVER", "SEQ_UNDER", "ACK_UNDER",
                                                     "INVALID_RST"}
    assert "lies 523" in md and "bytes beyond the data the other side sent" in md
    assert [a["rule"] for a in rep["advice"]] == ["seq-randomization", "be-liberal",
                                                  "ignore-invalid-rst"]
    assert rep["capture"]["lost"] == 3 and rep["capture"]["events_total"] == 82


def test_bundle_replays_to_the_same_tables(tmp_path):
    out = tmp_path / "r1"
    rep1 = write_bundle(str(out), fixture_capture())
    assert sorted(os.listdir(out)) == ["events.ndjson", "report.json", "report.md"]
    json.loads((out / "report.json").read_text())
    rep2 = build_report(capture_from_recording(read_recording(str(out / "events.ndjson"))))
    assert rep2["peers"] == rep1["peers"]
    assert rep2["advice"] == rep1["advice"]
    assert rep2["netns"] == rep1["netns"]
    assert rep2["ruleset"] == rep1["ruleset"]
    assert rep2["conntrack_stat_delta"] == rep1["conntrack_stat_delta"]


def test_event_budget_keeps_samples_and_counts_the_rest(tmp_path):
    budget = EventBudget(max_events=10, per_key=2)
    for i in range(100):
        budget.add(make_event(seq=i, saddr="203.0.113.7"))
    for i in range(5):
        budget.add(make_event(seq=i, saddr="198.51.100.1", reason="INVALID_RST"))
    assert len(budget.kept) == 12          # 10, then 2 samples of the new (peer, reason)
    assert budget.omitted_count == 93
    cap = Capture(events=budget.kept, omitted=budget.omitted_records(), start=1, end=2)
    rep = build_report(cap)
    counts = {(p["peer"], p["reason"]): p["packets"] for p in rep["peers"]}
    assert counts == {("203.0.113.7", "SEQ_OVER"): 100, ("198.51.100.1", "INVALID_RST"): 5}
    assert rep["capture"]["events_omitted"] == 93
    # the bounded file says what it left out, and replays to the same counts
    write_bundle(str(tmp_path / "b"), cap)
    rec = read_recording(str(tmp_path / "b" / "events.ndjson"))
    assert len(rec.events) == 12 and sum(o["count"] for o in rec.omitted) == 93
    rep2 = build_report(capture_from_recording(rec))
    assert {(p["peer"], p["reason"]): p["packets"] for p in rep2["peers"]} == counts


def test_replay_can_rebound_with_max_events():
    cap = fixture_capture(max_events=10)
    assert len(cap.events) < 82
    rep = build_report(cap)
    assert rep["capture"]["events_total"] == 82


def test_filter_ruleset_keeps_invalid_lines_with_context():
    ipt = "*filter\n:INPUT ACCEPT [0:0]\n[5:300] -A INPUT -m conntrack --ctstate INVALID -j DROP\n" \
          "[1:60] -A INPUT -j ACCEPT\nCOMMIT\n"
    lines = filter_ruleset(ipt, "iptables")
    assert lines == [{"tool": "iptables", "context": "filter",
                      "line": "[5:300] -A INPUT -m conntrack --ctstate INVALID -j DROP"}]
    nft = "table inet fw4 {\n\tchain forward {\n\t\tct state invalid counter packets 3 bytes 120 drop\n"
    (line,) = filter_ruleset(nft, "nft")
    assert line["context"] == "inet fw4 forward" and "packets 3" in line["line"]


def test_samples_prefer_invalid_events():
    evs = [make_event(verdict="ignored"), make_event(verdict="invalid", seq=7)]
    (s,) = samples_per_reason(evs)
    assert s.seq == 7


def test_empty_capture_still_writes_a_report(tmp_path):
    rep = write_bundle(str(tmp_path / "e"), Capture(events=[], start=1, end=2))
    md = (tmp_path / "e" / "report.md").read_text()
    assert "No segment was rejected" in md and rep["advice"] == []


def test_omitted_records_keep_their_times(tmp_path):
    budget = EventBudget(max_events=1, per_key=0)
    for i in range(3):
        budget.add(make_event(time=100.0 + i))
    cap = Capture(events=budget.kept, omitted=budget.omitted_records(), start=1, end=2)
    write_bundle(str(tmp_path / "t"), cap)
    rep = build_report(capture_from_recording(read_recording(str(tmp_path / "t" / "events.ndjson"))))
    (row,) = rep["peers"]
    assert (row["packets"], row["first_seen"], row["last_seen"]) == (3, 100.0, 102.0)


def test_event_budget_stays_bounded_with_many_distinct_senders():
    from conntrace.report import EventBudget
    from event_factory import make_event
    budget = EventBudget(max_events=100, per_key=3)
    budget.MAX_SAMPLE_KEYS, budget.MAX_OMITTED_KEYS = 50, 200
    for i in range(5000):
        budget.add(make_event(saddr=f"198.18.{i // 256}.{i % 256}"))
    assert len(budget.kept) <= 100 + 50 * 3
    assert len(budget.omitted) <= 201
    assert len(budget.kept) + budget.omitted_count == 5000      # every event still counted
