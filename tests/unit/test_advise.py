"""Every advice rule, driven by recorded events."""
import pytest

from conntrace.advise import AdviceInput, advise, APPLY
from conntrace.events import WindowSide
from conntrace.ndjson import read_recording
from conntrace.report import capture_from_recording
from event_factory import make_event, MIDDLEBOX

HOST, WEB = 4026531840, 4026532451
NAMES = {WEB: {"names": ["web"], "pids": [2211]}, HOST: {"names": [], "pids": [1]},
         777: {"names": [], "pids": [4242]}}


def knobs(liberal=0, rst=0):
    return {"nf_conntrack_tcp_be_liberal": liberal, "nf_conntrack_tcp_ignore_invalid_rst": rst,
            "nf_conntrack_tcp_loose": 1, "nf_conntrack_checksum": 1}


def run(events, sysctls=None, kernel="6.1.0-41-amd64", rows=None):
    return advise(AdviceInput(events=events, rows=rows, sysctls=sysctls or {}, netns_names=NAMES,
                              own_netns=HOST, kernel=kernel))


def rules(advice):
    return [a.rule for a in advice]


def by_rule(advice, rule):
    found = [a for a in advice if a.rule == rule]
    assert found, f"no {rule} in {rules(advice)}"
    return found[0]


def sack_over(i=0, **kw):
    ack = 1_850_000_000 + i * 1000
    sack = ack + 523_906_048
    base = dict(reason="SACK_OVER", ack=ack, sack=sack, bound=ack + 2897,
                distance=sack - (ack + 2897) + 1, flags="A", payload=0, time=100.0 + i,
                message=f"ACK is over upper bound {ack + 2897} (ACKed data not seen yet)")
    base.update(kw)
    return make_event(**base)


def test_window_reasons_with_liberal_off_advise_be_liberal_in_that_netns():
    evs = [make_event(netns=WEB) for _ in range(12)]
    a = by_rule(run(evs, {WEB: knobs(0)}), "be-liberal")
    assert a.confidence == "high" and a.netns == WEB and a.apply == "be-liberal"
    assert "ip netns exec web sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1" in a.actions
    assert any("--conntrack-tcp-be-liberal" in x for x in a.actions)
    assert any("/etc/sysctl.d" in p for p in a.persist)
    assert any("12 segments INVALID" in e for e in a.evidence)
    assert any("203.0.113.7 (12)" in e for e in a.evidence)
    assert any("seq 1005 lies 5 bytes beyond" in e for e in a.evidence)
    assert a.tradeoffs


def test_be_liberal_in_host_netns_persists_with_modules_load():
    a = by_rule(run([make_event()] * 3, {HOST: knobs(0)}), "be-liberal")
    assert "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1" in a.actions
    assert any("/etc/modules-load.d/nf_conntrack.conf" in p for p in a.persist)
    assert a.confidence == "medium"           # only 3 segments


def test_unnamed_netns_uses_nsenter():
    a = by_rule(run([make_event(netns=777)], {}), "be-liberal")
    assert a.actions[0].startswith("nsenter --net=/proc/4242/ns/net sysctl -w")
    a = by_rule(run([make_event(netns=9)], {}), "be-liberal")
    assert "<PID in netns 9>" in a.actions[0]


def test_sack_over_with_ack_in_range_is_a_sequence_randomizing_middlebox():
    evs = [sack_over(i) for i in range(5)]
    adv = run(evs, {HOST: knobs(0)})
    a = by_rule(adv, "seq-randomization")
    assert "Cisco ASA/FTD" in a.title and a.confidence == "high"
    assert any("random-sequence-number disable" in x for x in a.actions)
    assert any("constant sequence offset" in e for e in a.evidence)
    assert any("ack 1850000000 is in range" in e for e in a.evidence)
    assert "be-liberal" in rules(adv)


def test_window_scale_asymmetry():
    seen = [WindowSide(td_end=5000, td_maxend=70000, td_maxwin=65535, td_scale=0, flags=0x23),
            WindowSide(td_end=900, td_maxend=1000, td_maxwin=64128, td_scale=0, flags=0x22)]
    adv = run([make_event(seen=seen) for _ in range(4)], {HOST: knobs(0)})
    a = by_rule(adv, "window-scale")
    assert "altered window scaling" in a.title
    assert any("only one direction announced window scaling" in e for e in a.evidence)
    assert any("tcpdump" in x for x in a.actions)
    # symmetric scaling: no such advice
    assert "window-scale" not in rules(run([make_event()] * 4, {HOST: knobs(0)}))


def test_window_scale_zeroed_on_one_side():
    seen = [WindowSide(td_end=5000, td_maxend=70000, td_maxwin=65535, td_scale=7, flags=0x23),
            WindowSide(td_end=900, td_maxend=1000, td_maxwin=64128, td_scale=0, flags=0x23)]
    assert "window-scale" in rules(run([make_event(seen=seen)], {HOST: knobs(0)}))


def test_invalid_rst_advises_ignore_invalid_rst_and_not_be_liberal():
    evs = [make_event(netns=WEB, reason="INVALID_RST", flags="R", bound=None, distance=None,
                      message="invalid rst", dir="original") for _ in range(12)]
    adv = run(evs, {WEB: knobs(0, 0)})
    a = by_rule(adv, "ignore-invalid-rst")
    assert "ip netns exec web sysctl -w net.netfilter.nf_conntrack_tcp_ignore_invalid_rst=1" \
        in a.actions
    assert any("NOT expect nf_conntrack_tcp_be_liberal" in x for x in a.actions)
    assert "be-liberal" not in rules(adv)
    assert a.apply == "ignore-invalid-rst" and APPLY["ignore-invalid-rst"][1] == 1


def test_invalid_rst_on_old_kernel_says_the_knob_is_missing():
    evs = [make_event(reason="INVALID_RST", flags="R", bound=None, distance=None)]
    a = by_rule(run(evs, {}, kernel="5.10.0-30-amd64"), "ignore-invalid-rst")
    assert "5.14" in a.actions[0]


def test_bad_checksum():
    evs = [make_event(reason="BAD_CHECKSUM", bound=None, distance=None, message="bad checksum")]
    a = by_rule(run(evs), "bad-checksum")
    assert any("ethtool -K" in x for x in a.actions)
    assert any("nf_conntrack_checksum=0" in x for x in a.actions)
    assert a.apply == "checksum-test"
    assert "be-liberal" not in rules(run(evs, {HOST: knobs(0)}))


def test_invalid_state_is_asymmetric_routing_with_notrack():
    evs = [make_event(reason="INVALID_STATE", bound=None, distance=None, ct_state="SYN_SENT",
                      message="packet (index 3) in dir 0 invalid, state SYN_SENT", flags="A",
                      dir="original")] * 3
    a = by_rule(run(evs), "asymmetric-routing")
    assert any("notrack" in x for x in a.actions)
    assert any("ip route get 203.0.113.7" in x for x in a.actions)


def test_one_sided_window_state_is_asymmetric_routing():
    seen = [WindowSide(td_end=5000, td_maxend=70000, td_maxwin=65535, td_scale=7, flags=0x23),
            WindowSide(td_end=0, td_maxend=0, td_maxwin=0, td_scale=7, flags=0x23)]
    adv = run([make_event(reason="ACK_OVER", seen=seen)] * 3, {HOST: knobs(0)})
    a = by_rule(adv, "asymmetric-routing")
    assert any("td_maxwin 0" in e for e in a.evidence)


def test_only_ignored_means_no_action():
    evs = [make_event(reason="SEQ_UNDER", verdict="ignored")] * 4
    adv = run(evs, {HOST: knobs(0)})
    assert rules(adv) == ["only-ignored"]
    assert "no action" in adv[0].title


def test_pre61_kernel_with_under_reasons():
    evs = [make_event(reason="SEQ_UNDER", verdict="invalid",
                      message="SEQ is under the lower bound (already ACKed data retransmitted)")]
    a = by_rule(run(evs, {}, kernel="5.10.0-30-amd64"), "pre-6.1-under")
    assert a.confidence == "high" and "6.1" in a.title
    assert by_rule(run(evs, {}, kernel=None), "pre-6.1-under").confidence == "medium"


def test_be_liberal_on_and_invalids_remain():
    evs = ([make_event(reason="INVALID_RST", flags="R", bound=None, distance=None)] * 2
           + [make_event(reason="BAD_FLAGS", flags="SF", bound=None, distance=None)])
    adv = run(evs, {HOST: knobs(1)})
    a = by_rule(adv, "liberal-remaining")
    assert "not window reasons" in a.title
    assert "INVALID_RST 2" in a.evidence[0] and "BAD_FLAGS 1" in a.evidence[0]
    assert "be-liberal" not in rules(adv)
    assert "bad-flags" in rules(adv)


def test_accepted_liberal_events_are_counted():
    evs = [make_event(verdict="accepted-liberal")] * 7
    adv = run(evs, {HOST: knobs(1)})
    a = by_rule(adv, "liberal-accepting")
    assert "accepting 7 segments that would be INVALID" in a.title
    assert "only-ignored" not in rules(adv) and "be-liberal" not in rules(adv)


def test_invalid_new_points_at_expired_entries():
    evs = [make_event(reason="INVALID_NEW", bound=None, distance=None, ct_state="NONE")]
    a = by_rule(run(evs, {HOST: dict(knobs(0), nf_conntrack_count=99, nf_conntrack_max=100)}),
                "entry-expired")
    assert any("99 of 100" in e for e in a.evidence)


def test_rows_give_exact_counts_without_events():
    from conntrace.aggregate import CountRow
    rows = [CountRow(netns=HOST, peer="203.0.113.7", reason="SACK_OVER", verdict="invalid",
                     packets=100_000)]
    adv = run([], {HOST: knobs(0)}, rows=rows)
    assert "seq-randomization" in rules(adv) and "be-liberal" in rules(adv)
    assert any("100\u2009000" in e or "100 000" in e for e in by_rule(adv, "be-liberal").evidence)


def test_nothing_seen_no_advice():
    assert run([]) == []


def test_middlebox_recording():
    cap = capture_from_recording(read_recording(MIDDLEBOX))
    adv = advise(AdviceInput(events=cap.events, rows=cap.all_rows(), sysctls=cap.sysctls,
                             netns_names=cap.meta["netns_names"], own_netns=cap.meta["own_netns"],
                             kernel=cap.meta["host"]["kernel"]))
    assert rules(adv) == ["seq-randomization", "be-liberal", "ignore-invalid-rst"]
    assert by_rule(adv, "be-liberal").netns == HOST
    assert by_rule(adv, "ignore-invalid-rst").netns == WEB


@pytest.mark.parametrize("advice_rule", ["be-liberal", "ignore-invalid-rst", "checksum-test"])
def test_apply_rules_name_real_knobs(advice_rule):
    from conntrace.sysctl import APPLICABLE
    knob, value = APPLY[advice_rule]
    assert value in APPLICABLE[knob]
