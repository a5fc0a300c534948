from types import SimpleNamespace

from conntrace.aggregate import (from_probe_rows, group_rows, peer_reason_table, recording_span,
                                 rows_from_events, sort_groups, totals_by_reason,
                                 totals_by_verdict, with_rates)
from event_factory import make_event


def events():
    return ([make_event(saddr="203.0.113.7", reason="SACK_OVER", time=100 + i) for i in range(5)]
            + [make_event(saddr="198.51.100.23", reason="INVALID_RST", dport=8080, time=101)] * 3
            + [make_event(saddr="192.0.2.44", reason="SEQ_UNDER", verdict="ignored", time=103)] * 2)


def test_rows_count_like_the_kernel_map():
    rows = rows_from_events(events())
    assert sum(r.packets for r in rows) == 10
    sack = [r for r in rows if r.reason == "SACK_OVER"][0]
    assert (sack.packets, sack.first_seen, sack.last_seen) == (5, 100, 104)
    assert sack.local == "10.0.0.5:51514" and sack.lport == 51514


def test_omitted_records_add_to_the_counts():
    rows = rows_from_events(events(), [{"netns": 4026531840, "peer": "203.0.113.7",
                                        "reason": "SACK_OVER", "verdict": "invalid", "count": 95}])
    assert totals_by_reason(rows)["SACK_OVER"] == 100
    table = peer_reason_table(rows)
    assert table[0][1:5] == ("203.0.113.7", "SACK_OVER", "invalid", 100)


def test_groupings():
    rows = rows_from_events(events())
    assert set(group_rows(rows, "peer")) == {("203.0.113.7",), ("198.51.100.23",), ("192.0.2.44",)}
    assert ("198.51.100.23", "10.0.0.5:8080") in group_rows(rows, "pair")
    assert set(group_rows(rows, "port")) == {(51514,), (8080,)}
    assert set(group_rows(rows, "netns")) == {(4026531840,)}
    g = group_rows(rows, "reason")[("SEQ_UNDER",)]
    assert g.packets == 2 and g.invalid == 0


def test_rates_are_deltas_and_sorted():
    before = group_rows(rows_from_events(events()), "peer")
    after_rows = rows_from_events(events() + [make_event(saddr="198.51.100.23",
                                                         reason="INVALID_RST")] * 20)
    after = group_rows(after_rows, "peer")
    ordered = with_rates(after, before, 2.0)
    assert ordered[0].label == "198.51.100.23" and ordered[0].rate == 10.0
    assert ordered[1].rate == 0.0


def test_rates_never_negative_after_eviction():
    big = group_rows(rows_from_events(events()), "peer")
    small = group_rows(rows_from_events(events()[:1]), "peer")
    assert all(g.rate >= 0 for g in with_rates(small, big, 1.0))


def test_replay_rates_are_averages():
    rows = rows_from_events(events())
    span = recording_span(rows)
    assert span == 4
    ordered = with_rates(group_rows(rows, "peer"), None, span)
    assert ordered[0].label == "203.0.113.7" and ordered[0].rate == 5 / 4


def test_probe_rows_from_decode_shape():
    r = SimpleNamespace(netns=1, family=4, peer="203.0.113.7", local="10.0.0.5", local_port=443,
                        peer_port=None, reason="SACK_OVER", verdict="invalid", packets=7, bytes=280,
                        first_seen=1.0, last_seen=2.0)
    (row,) = from_probe_rows([r])
    assert row.local == "10.0.0.5:443" and row.lport == 443 and row.packets == 7
    bare = SimpleNamespace(netns=1, peer="::1", reason="SEQ_OVER", verdict="invalid", packets=1,
                           bytes=0, first_seen=0, last_seen=0)
    (row,) = from_probe_rows([bare])
    assert row.local is None
    assert group_rows([row], "pair")[("::1", "?")].packets == 1


def test_totals_by_verdict():
    assert totals_by_verdict(rows_from_events(events())) == {"invalid": 8, "ignored": 2}
    assert sort_groups([]) == []
