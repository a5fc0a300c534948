from conntrace import render
from conntrace.advise import AdviceInput, advise
from conntrace.aggregate import group_rows, rows_from_events, with_rates
from conntrace.events import REASONS, VERDICTS, TCP_STATES
from conntrace.ndjson import read_recording
from event_factory import make_event, MIDDLEBOX

LONG6 = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"


def test_header_and_lines_fit_120_columns_for_every_reason_verdict_and_state():
    assert len(render.trace_header()) <= 120
    for reason in REASONS:
        for verdict in VERDICTS:
            for state in TCP_STATES:
                ev = make_event(reason=reason, verdict=verdict, ct_state=state, family=6,
                                saddr=LONG6, daddr=LONG6, sport=65535, dport=65535,
                                seq=4294967295, ack=4294967295, sack=4294967295,
                                bound=4294967295, distance=-2147483648, flags="FSRPAUEC")
                line = render.trace_line(ev)
                assert len(line) <= 120, line


def test_line_reads_reason_first_with_the_numbers():
    line = render.trace_line(make_event(reason="SACK_OVER", sack=3000065537, bound=3000000001,
                                        distance=65537))
    assert line.split()[1] == "SACK_OVER"
    assert "sack 3000065537" in line and "3000000001" in line
    assert "+65\u2009537" in line or "+65 537" in line
    assert "203.0.113.7:443" in line and "10.0.0.5:51514" in line


def test_large_distances_are_compact_in_the_table():
    assert "GiB" in render.trace_line(make_event(distance=2 ** 30 + 5))
    assert "MiB" in render.trace_line(make_event(distance=5 * 2 ** 20))


def test_ipv6_is_bracketed_and_elided_in_the_middle():
    s = render.elide(render.endpoint(LONG6, 443), 21)
    assert len(s) == 21 and s.startswith("[2001") and s.endswith(":443")


def test_fmt_int_groups_digits():
    assert render.fmt_int(65536, " ") == "65 536"
    assert render.fmt_int(-1234567, " ") == "-1 234 567"
    assert render.fmt_int(None) == "-"


def test_explain_seq_over_in_words():
    ev = make_event(reason="SEQ_OVER", seq=1_000_000, bound=934_465, distance=65_536)
    text = render.explain(ev).replace("\u2009", " ")
    assert text.startswith("seq 1000000 lies 65 536 bytes beyond the receiver's window edge 934 464")


def test_explain_every_reason_is_one_sentence():
    for reason in REASONS:
        text = render.explain(make_event(reason=reason))
        assert text.endswith(".") and "\n" not in text


def test_off_by_recomputed_when_decode_gave_none():
    assert render.off_by(make_event(reason="SEQ_OVER", seq=1005, bound=1001, distance=None)) == 5
    assert render.off_by(make_event(reason="SEQ_UNDER", seq=990, bound=1001, distance=None)) == 12
    assert render.off_by(make_event(reason="INVALID_RST", bound=None, distance=None)) is None


def test_footer_mentions_lost_events():
    text = render.trace_footer(10, 2, 7, 3.0)
    assert "7 lost" in text and "could not keep up" in text and "2 filtered out" in text
    assert "0 lost" in render.trace_footer(1, 0, 0, 1.0)


def test_top_table_and_header_fit_120_columns():
    rec = read_recording(MIDDLEBOX)
    rows = rows_from_events(rec.events * 3 + [make_event(saddr=LONG6, daddr=LONG6, family=6)])
    for by in ("peer", "pair", "port", "netns", "reason"):
        ordered = with_rates(group_rows(rows, by), None, 20)
        text = render.top_table(ordered, by, 1795680030.0)
        assert all(len(l) <= 120 for l in text.splitlines()), text
    header = render.top_header(1795680030.0, "deferred",
                               {4026531840: {"nf_conntrack_tcp_be_liberal": 0}}, 55, 3, 9, 1.0,
                               {4026531840: "host(4026531840)"})
    assert "be_liberal=0" in header and "+55" in header and "lost events: 3" in header
    assert "map overflow: 9" in header and "evicted" in header
    assert all(len(l) <= 120 for l in header.splitlines())


def test_top_table_limit_says_how_many_are_hidden():
    rows = rows_from_events([make_event(saddr=f"192.0.2.{i}") for i in range(30)])
    text = render.top_table(with_rates(group_rows(rows, "peer"), None, 1), "peer", 0, limit=5)
    assert "25 more groups" in text


def test_advice_text_wraps_prose_but_keeps_commands_whole():
    rec = read_recording(MIDDLEBOX)
    adv = advise(AdviceInput(events=rec.events, sysctls=rec.meta["sysctls"],
                             netns_names=rec.meta["netns_names"], own_netns=rec.meta["own_netns"]))
    text = render.advice_text(adv)
    for line in text.splitlines():
        body = line.split(None, 1)[-1] if line.strip() else ""
        assert len(line) <= 120 or render.is_command(body.split(None, 1)[-1]), line
    assert "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1" in text
    short = render.advice_text(adv, verbose=False)
    assert "do:" not in short and "evidence:" in short
