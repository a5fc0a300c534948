"""The CLI end to end with a fake probe: no bcc, no root, no kernel."""
import json
import os
import sys
import types
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from conntrace import cli as cli_mod
from conntrace.cli import cli
from event_factory import make_event, MIDDLEBOX


class ProbeError(Exception):
    pass


@dataclass
class AttachPlan:
    rung: str = "deferred"
    probes: list = None
    missing: list = None
    abi: dict = None


@dataclass
class ProbeFilters:
    netns: int = None
    port: int = None


@dataclass
class Row:
    netns: int
    family: int
    peer: str
    local: str
    local_port: int
    peer_port: None
    reason: str
    verdict: str
    packets: int
    bytes: int
    first_seen: float
    last_seen: float


class FakeProbe:
    """Replays scripted batches; a batch may be an exception to raise (Ctrl-C)."""
    instances = []
    batches = []
    lost_script = []
    agg_script = []

    backlog_script = 0            # records still undecoded when the run ends

    def __init__(self, plan=None, *, aggregate=False, events=True, ringbuf_pages=256, filters=None,
                 backlog=65536):
        self.plan, self.aggregate, self.events, self.filters = plan, aggregate, events, filters
        self.backlog = backlog
        self.closed = self.started = False
        self.polls = 0
        self.reads = 0
        self.discarded = None
        FakeProbe.instances.append(self)

    def discard_backlog(self):
        self.discarded = FakeProbe.backlog_script
        return self.discarded

    def start(self):
        self.started = True

    def poll(self, timeout_ms=100):
        self.polls += 1
        if not FakeProbe.batches:
            return []
        b = FakeProbe.batches.pop(0)
        if isinstance(b, BaseException):
            raise b
        return b

    def lost_events(self):
        idx = min(self.polls, len(FakeProbe.lost_script)) - 1
        return (FakeProbe.lost_script[idx] if idx >= 0 else 0) + (self.discarded or 0)

    def read_aggregates(self):
        self.reads += 1
        if not FakeProbe.agg_script:
            return []
        return FakeProbe.agg_script[min(self.reads, len(FakeProbe.agg_script)) - 1]

    def aggregate_overflow(self):
        return 0

    def netns_knobs(self):
        return {4026531840: {"be_liberal": 0, "loose": 1, "ignore_invalid_rst": 0}}

    def close(self):
        self.closed = True


def fake_module(plan_error=None):
    mod = types.SimpleNamespace(ProbeError=ProbeError, AttachPlan=AttachPlan,
                                ProbeFilters=ProbeFilters, Probe=FakeProbe)

    def plan_attach():
        if plan_error:
            raise ProbeError(plan_error)
        return AttachPlan(rung="deferred", probes=["kprobe:nf_tcp_log_invalid"], missing=[], abi={})
    mod.plan_attach = plan_attach
    return mod


@pytest.fixture
def fake(monkeypatch):
    FakeProbe.instances, FakeProbe.batches, FakeProbe.lost_script, FakeProbe.agg_script = [], [], [], []
    FakeProbe.backlog_script = 0
    monkeypatch.setattr(cli_mod, "load_probe", lambda: fake_module())
    monkeypatch.setattr(cli_mod, "is_root", lambda: True)
    monkeypatch.setattr(cli_mod.time, "sleep", lambda s: None)
    return FakeProbe


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, code=None):
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    if code is not None:
        assert result.exit_code == code, result.output
    else:
        assert result.exit_code != 0


# ---- trace ----------------------------------------------------------------------------------

def test_trace_live_table_count_and_footer(fake):
    fake.batches = [[make_event(seq=i) for i in range(3)], [make_event(reason="SACK_OVER", sack=9)]]
    r = run("trace", "--count", "4")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("TIME     REASON")
    assert "compiling and attaching" in r.stderr
    assert sum(1 for l in lines if l.split()[1:2] == ["SEQ_OVER"]) == 3
    assert "4 events shown" in r.output and "0 lost" in r.output
    p = fake.instances[0]
    assert p.closed and p.events and p.aggregate
    assert p.discarded is None           # stopped by --count: what waited is not "lost"
    assert "Advice:" in r.output


def test_trace_ctrl_c_detaches_and_prints_the_summary(fake):
    fake.batches = [[make_event()], KeyboardInterrupt()]
    r = run("trace")
    assert r.exit_code == 0, r.output
    assert fake.instances[0].closed
    assert "1 event shown" in r.output


def test_trace_lost_events_footer_line_and_record(fake, tmp_path):
    fake.batches = [[make_event()], [make_event()], KeyboardInterrupt()]
    fake.lost_script = [0, 5, 7]
    out = tmp_path / "rec.ndjson"
    r = run("trace", "--write", str(out))
    assert r.exit_code == 0, r.output
    assert "!! 5 events lost" in r.output
    assert "7 lost" in r.output.splitlines()[-1] or "7 lost" in r.output
    records = [json.loads(l) for l in out.read_text().splitlines()]
    types_ = [d["type"] for d in records]
    assert types_[0] == "meta" and types_[-1] == "summary" and types_.count("event") == 2
    lost = [d for d in records if d["type"] == "lost"]
    assert sum(d["count"] for d in lost) == 7 and lost[-1]["total"] == 7
    assert records[-1]["lost"] == 7
    assert all(d["schema"] == 1 for d in records)


def _seq_over_rows(n_a, n_b):
    return [Row(4026531840, 4, "203.0.113.7", "10.0.0.5", 51514, None, "SEQ_OVER", "invalid",
                n_a, n_a * 40, 1.0, 2.0),
            Row(4026531840, 4, "198.51.100.23", "10.0.0.5", 8080, None, "INVALID_RST", "invalid",
                n_b, n_b * 40, 1.0, 2.0)]


def test_trace_under_a_flood_gives_the_kernels_exact_totals(fake, tmp_path):
    # 2 events reached us, 3 were discarded undecoded at the end, the kernel counted 10 005
    fake.batches = [[make_event(), make_event()]]
    fake.lost_script = [0, 9000]
    fake.backlog_script = 3
    fake.agg_script = [_seq_over_rows(10_000, 5)]
    out = tmp_path / "rec.ndjson"
    r = run("trace", "--duration", "0.01", "--write", str(out), "--backlog", "100")
    assert r.exit_code == 0, r.output
    p = fake.instances[0]
    assert p.backlog == 100 and p.discarded == 3
    assert "9 003 lost" in r.output.replace("\u2009", " ")
    counted = [l for l in r.output.splitlines() if "the kernel counted" in l]
    assert counted and "10 005" in counted[0].replace("\u2009", " ")
    assert "SEQ_OVER 10 000" in counted[0].replace("\u2009", " ") and "INVALID_RST 5" in counted[0]
    # the advice sees every packet the kernel counted, not only the two shown
    assert "10 000" in r.output.split("Advice:")[1].replace("\u2009", " ") or \
        "10000" in r.output.split("Advice:")[1]
    # the recording carries them too: a replay has the exact per-peer totals
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert records[-1]["counted"] == 10_005
    unseen = [d for d in records if d["type"] == "omitted"]
    assert {(d["peer"], d["reason"], d["count"]) for d in unseen} == \
        {("203.0.113.7", "SEQ_OVER", 9_998), ("198.51.100.23", "INVALID_RST", 5)}
    replay = run("trace", "--from", str(out))
    line = [l for l in replay.output.splitlines() if "the kernel counted" in l]
    assert line and line[0] == counted[0]                 # the same view as live
    replay = run("trace", "--from", str(out), "--reason", "INVALID_RST", "--json")
    assert json.loads(replay.stdout.splitlines()[-1])["counted"] == 5
    top = run("top", "--from", str(out), "--json")
    snap = json.loads(top.stdout.splitlines()[-1])
    assert {g["label"]: g["packets"] for g in snap["groups"]} == \
        {"203.0.113.7": 10_000, "198.51.100.23": 5}


def test_trace_kernel_totals_obey_the_filters(fake):
    fake.batches = [[make_event()]]
    fake.agg_script = [_seq_over_rows(40, 5)]
    r = run("trace", "--duration", "0.01", "--reason", "SEQ_OVER", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["type"] == "summary" and summary["counted"] == 40 and summary["events"] == 1
    r = run("trace", "--duration", "0.01", "--peer", "198.51.100.0/24", "--json")
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["counted"] == 5


def test_trace_kernel_totals_are_anonymized_with_the_events(fake, tmp_path):
    fake.batches = [[make_event(saddr="203.0.113.7")]]
    fake.agg_script = [_seq_over_rows(50, 0)]
    out = tmp_path / "rec.ndjson"
    r = run("trace", "--duration", "0.01", "--write", str(out), "--anonymize")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "203.0.113.7" not in text and "203.0.113.7" not in r.output
    unseen = [json.loads(l) for l in text.splitlines() if json.loads(l)["type"] == "omitted"]
    event = [json.loads(l) for l in text.splitlines() if json.loads(l)["type"] == "event"][0]
    # the pseudonym of the shown event's sender is the one its unseen packets are counted under
    assert [(d["peer"], d["count"]) for d in unseen] == [(event["saddr"], 49)]


def test_trace_json_is_ndjson_with_summary(fake):
    fake.batches = [[make_event(), make_event(reason="INVALID_RST", bound=None, distance=None)]]
    r = run("trace", "--json", "--count", "2")
    recs = [json.loads(l) for l in r.stdout.splitlines()]      # stdout stays pure NDJSON
    assert [d["type"] for d in recs] == ["event", "event", "summary"]
    assert recs[0]["schema"] == 1 and recs[0]["reason"] == "SEQ_OVER"
    assert recs[-1]["events"] == 2 and isinstance(recs[-1]["advice"], list)


def test_trace_filters_in_user_space(fake):
    fake.batches = [[make_event(saddr="203.0.113.7"), make_event(saddr="198.51.100.9"),
                     make_event(reason="INVALID_RST", saddr="203.0.113.8"),
                     make_event(verdict="ignored", saddr="203.0.113.9")]]
    r = run("trace", "--peer", "203.0.113.0/24", "--reason", "seq_over", "--verdict", "invalid",
            "--port", "443", "--duration", "0.01")
    assert r.exit_code == 0, r.output
    assert "1 event shown, 3 filtered out" in r.output
    f = fake.instances[0].filters
    assert f.port == 443 and f.netns is None


@pytest.mark.parametrize("args,words", [
    (["--peer", "300.1.1.1/24"], "not an address or CIDR"),
    (["--port", "70000"], "70000"),
    (["--port", "0"], "0"),
    (["--reason", "SEQ_WAY_OVER"], "SEQ_WAY_OVER"),
    (["--verdict", "dropped"], "dropped"),
    (["--netns", "-3"], "-3"),
    (["--count", "0"], "0"),
])
def test_bad_filter_values_are_one_line_errors(fake, args, words):
    r = run("trace", *args)
    one_line_error(r, 2)
    assert words in r.output
    assert not fake.instances          # nothing attached


def test_probe_error_is_one_line_exit_1(monkeypatch):
    monkeypatch.setattr(cli_mod, "load_probe", lambda: fake_module("kprobes are unavailable"))
    monkeypatch.setattr(cli_mod, "is_root", lambda: True)
    r = run("trace")
    one_line_error(r, 1)
    assert r.output.strip() == "conntrace: kprobes are unavailable"


def test_no_root_says_so(monkeypatch):
    monkeypatch.setattr(cli_mod, "load_probe", lambda: fake_module())
    monkeypatch.setattr(cli_mod, "is_root", lambda: False)
    for cmd in (["trace"], ["top"], ["report", "--duration", "1"], ["advise"]):
        r = run(*cmd)
        one_line_error(r, 1)
        assert "needs root" in r.output and "--from FILE" in r.output


def test_missing_bcc_is_one_line(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_probe(name, *a, **kw):
        if name.endswith("probe") or (a and a[2] and "probe" in a[2]):
            raise ImportError("No module named 'bcc'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_probe)
    r = run("trace")
    one_line_error(r, 1)
    assert "conntrace doctor" in r.output


def test_trace_replay(fake):
    r = run("trace", "--from", MIDDLEBOX)
    assert r.exit_code == 0, r.output
    assert "82 events shown" in r.output and "3 lost" in r.output
    assert not fake.instances                     # no probe for a replay
    r = run("trace", "--from", MIDDLEBOX, "--reason", "INVALID_RST", "--count", "2")
    assert "2 events shown" in r.output


def test_replay_of_bad_files(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"\x00\x01garbage\n{oops\n")
    r = run("trace", "--from", str(bad))
    one_line_error(r, 1)
    assert f"{bad}:1" in r.output and len(r.output.strip().splitlines()) == 1
    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    r = run("top", "--from", str(empty))
    one_line_error(r, 1)
    assert "empty file" in r.output
    r = run("report", "--from", str(tmp_path / "missing.ndjson"), "--out", str(tmp_path / "o"))
    one_line_error(r, 1)
    assert "cannot open" in r.output


def test_replay_with_some_bad_lines_reports_on_the_good_ones(tmp_path):
    mixed = tmp_path / "mixed.ndjson"
    lines = open(MIDDLEBOX).read().splitlines()
    lines.insert(5, "{truncated")
    lines.insert(9, "\x00\x00")
    mixed.write_text("\n".join(lines) + "\n")
    r = run("top", "--from", str(mixed))
    assert r.exit_code == 0, r.output
    assert "skipped 2 bad lines" in r.output and "203.0.113.7" in r.output


def test_anonymize_keep_prefix_needs_anonymize():
    r = run("trace", "--from", MIDDLEBOX, "--anonymize-keep-prefix", "24")
    one_line_error(r, 2)


# ---- top --------------------------------------------------------------------------------------

def rows(n_sack, n_rst):
    return [Row(4026531840, 4, "203.0.113.7", "10.0.0.5", 51514, None, "SACK_OVER", "invalid",
                n_sack, n_sack * 40, 1.0, 2.0),
            Row(4026531840, 4, "198.51.100.23", "10.0.0.5", 8080, None, "INVALID_RST", "invalid",
                n_rst, n_rst * 40, 1.0, 2.0)]


def test_top_live_json_snapshots_use_the_kernel_counts(fake):
    fake.agg_script = [rows(100, 10), rows(100_100, 30)]
    r = run("top", "--json", "--count", "2", "--interval", "1")
    assert r.exit_code == 0, r.output
    snaps = [json.loads(l) for l in r.stdout.splitlines()]
    assert [s["type"] for s in snaps] == ["top", "top"]
    g = snaps[1]["groups"][0]
    assert g["label"] == "203.0.113.7" and g["packets"] == 100_100
    assert snaps[1]["rung"] == "deferred" and "lost" in snaps[1] and "map_overflow" in snaps[1]
    assert "conntrack_invalid_since_start" in snaps[1]
    p = fake.instances[0]
    assert p.aggregate and not p.events and p.closed and p.polls == 0    # never per-event work


def test_top_live_plain_table_when_not_a_tty(fake):
    fake.agg_script = [rows(5, 1)]
    r = run("top", "--count", "1")
    assert r.exit_code == 0, r.output
    assert "rung: deferred" in r.output and "be_liberal=" in r.output
    assert "PEER" in r.output and "SACK_OVER 5" in r.output
    assert "\033[2J" not in r.output
    assert "seq-randomization" in r.output            # advice under top


def test_top_ctrl_c(fake):
    fake.agg_script = [rows(1, 1)]

    def interrupted(_):
        raise KeyboardInterrupt
    cli_mod.time.sleep = interrupted
    r = run("top", "--json")
    assert r.exit_code == 0 and fake.instances[0].closed
    # Ctrl-C before the first refresh still shows the totals counted so far.
    snaps = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(snaps) == 1 and snaps[0]["groups"][0]["packets"] == 1


def test_top_replay_groupings():
    for by in ("peer", "pair", "port", "netns", "reason"):
        r = run("top", "--from", MIDDLEBOX, "--by", by)
        assert r.exit_code == 0, r.output
        assert "replay of middlebox.ndjson" in r.output
    r = run("top", "--from", MIDDLEBOX, "--json")
    snap = json.loads(r.output)
    assert snap["groups"][0]["label"] == "203.0.113.7" and snap["groups"][0]["packets"] == 40


# ---- advise -----------------------------------------------------------------------------------

def test_advise_from_recording():
    r = run("advise", "--from", MIDDLEBOX)
    assert r.exit_code == 0, r.output
    assert "Cisco ASA/FTD" in r.output and "ignore_invalid_rst=1" in r.output
    data = json.loads(run("advise", "--from", MIDDLEBOX, "--json").output)
    assert [a["rule"] for a in data] == ["seq-randomization", "be-liberal", "ignore-invalid-rst"]


def test_advise_live_short_capture(fake):
    fake.batches = [[make_event() for _ in range(12)]]
    fake.agg_script = [rows(12, 0)]
    r = run("advise", "--duration", "0.05")
    assert r.exit_code == 0, r.output
    assert "be-liberal" in r.output and fake.instances[0].closed


def test_advise_apply_changes_only_the_named_netns(monkeypatch, tmp_path):
    calls = []
    ref = cli_mod.sysctl.NetnsRef(path="/var/run/netns/web", inode=4026532451, name="web")
    monkeypatch.setattr(cli_mod.sysctl, "resolve_netns", lambda spec: calls.append(spec) or ref)

    def fake_apply(r, knob, value):
        calls.append((r.name, knob, value))
        return 0, cli_mod.sysctl.sysctl_command(r, knob, 0)
    monkeypatch.setattr(cli_mod.sysctl, "apply_sysctl", fake_apply)
    r = run("advise", "--apply", "be-liberal", "--netns", "web")
    assert r.exit_code == 0, r.output
    assert calls == ["web", ("web", "nf_conntrack_tcp_be_liberal", 1)]
    assert "net.netfilter.nf_conntrack_tcp_be_liberal 0 -> 1" in r.output
    assert "undo: ip netns exec web sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=0" in r.output


def test_advise_apply_needs_netns_and_a_known_rule():
    one_line_error(run("advise", "--apply", "be-liberal"), 2)
    one_line_error(run("advise", "--apply", "reboot", "--netns", "web"), 2)
    r = run("advise", "--apply", "be-liberal", "--netns", "no-such-ns-xyz")
    one_line_error(r, 1)
    assert "no network namespace named" in r.output


# ---- report -----------------------------------------------------------------------------------

def test_report_live_ctrl_c_still_writes(fake, tmp_path):
    fake.batches = [[make_event(reason="SACK_OVER", sack=5, ack=1) for _ in range(5)],
                    KeyboardInterrupt()]
    fake.agg_script = [rows(7, 0)]         # the kernel counted 2 events we never received
    out = tmp_path / "rep"
    r = run("report", "--duration", "60", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["events.ndjson", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["peers"][0]["packets"] == 7            # exact counts from the kernel map
    assert rep["host"]["rung"] == "deferred"
    assert fake.instances[0].closed
    md = (out / "report.md").read_text()
    assert "## Advice" in md and "SACK_OVER" in md


def test_report_replay(tmp_path):
    r = run("report", "--from", MIDDLEBOX, "--out", str(tmp_path / "r"), "--max-events", "20")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["capture"]["events_total"] == 82 and rep["capture"]["events_written"] < 82


# ---- doctor -----------------------------------------------------------------------------------

def test_doctor_delegates(monkeypatch):
    mod = types.ModuleType("conntrace.doctor")
    mod.run_doctor = lambda out=print: (out("all good"), 3)[1]
    monkeypatch.setitem(sys.modules, "conntrace.doctor", mod)
    r = run("doctor")
    assert r.exit_code == 3 and "all good" in r.output


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "trace" in r.output and "report" in r.output
    assert run("--version").exit_code == 0


def test_trace_sigterm_detaches_like_ctrl_c(fake):
    import signal

    fake.batches = [[make_event()], "TERM"]
    orig_poll = FakeProbe.poll

    def poll(self, timeout_ms=100):
        if FakeProbe.batches and FakeProbe.batches[0] == "TERM":
            FakeProbe.batches.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            return []
        return orig_poll(self, timeout_ms)
    FakeProbe.poll = poll
    try:
        r = run("trace")
    finally:
        FakeProbe.poll = orig_poll
    assert r.exit_code == 0, r.output
    assert fake.instances[0].closed and "1 event shown" in r.output
    assert signal.getsignal(signal.SIGTERM) is not None


def test_meta_with_odd_types_still_writes(fake, tmp_path):
    fake.batches = [[make_event()]]
    out = tmp_path / "w.ndjson"
    r = run("trace", "--write", str(out), "--count", "1")
    assert r.exit_code == 0, r.output
    meta = json.loads(out.read_text().splitlines()[0])
    assert meta["type"] == "meta" and meta["rung"] == "deferred" and "host" in meta


def test_top_refreshes_in_place_on_a_terminal(fake, monkeypatch):
    monkeypatch.setattr(cli_mod, "stdout_is_tty", lambda: True)
    fake.agg_script = [rows(5, 1), rows(9, 1)]
    r = run("top", "--count", "2")
    assert r.exit_code == 0, r.output
    assert r.output.count("\033[H\033[2J") == 2
    assert "SACK_OVER 9" in r.output.split("\033[2J")[-1]


# ---- property-based: no replay input makes any command show a traceback ---------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_FIXTURE_LINES = open(MIDDLEBOX).read().splitlines()
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8)


def _mutate(record: dict, data) -> dict:
    """Replace one value somewhere in the record (top level or one level down)."""
    key = data.draw(st.sampled_from(sorted(record)))
    if isinstance(record[key], dict) and record[key] and data.draw(st.booleans()):
        sub = data.draw(st.sampled_from(sorted(record[key])))
        record[key][sub] = data.draw(_json_values)
    else:
        record[key] = data.draw(_json_values)
    return record


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_replay_never_shows_a_traceback(tmp_path_factory, data):
    lines = list(_FIXTURE_LINES)
    # always mutate meta or summary (the records replay trusts most), sometimes an event too
    idx = [0, len(lines) - 1] + ([data.draw(st.integers(1, len(lines) - 2))]
                                  if data.draw(st.booleans()) else [])
    for i in idx:
        lines[i] = json.dumps(_mutate(json.loads(lines[i]), data))
    d = tmp_path_factory.mktemp("fz")
    path = d / "rec.ndjson"
    path.write_text("\n".join(lines) + "\n")
    for args in (["report", "--from", str(path), "--out", str(d / "out")],
                 ["top", "--from", str(path)], ["advise", "--from", str(path)],
                 ["trace", "--from", str(path)]):
        r = CliRunner().invoke(cli, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            (args, repr(r.exception), lines[idx[0]][:200])
        assert "Traceback" not in r.output


# ---- --duration counts from attach ---------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def time(self):
        return self.now


@pytest.mark.parametrize("command", [["trace", "--json", "--duration", "1"],
                                     ["report", "--duration", "1"]])
def test_duration_counts_from_attach_not_from_the_compile(fake, monkeypatch, tmp_path, command):
    """A BCC compile can take minutes in a VM; the capture must still last --duration."""
    clock = _Clock()
    monkeypatch.setattr(cli_mod.time, "time", clock.time)

    def slow_start(self):                 # the compile
        self.started = True
        clock.now += 120.0

    def ticking_poll(self, timeout_ms=100):
        self.polls += 1
        clock.now += timeout_ms / 1000
        return []

    monkeypatch.setattr(FakeProbe, "start", slow_start)
    monkeypatch.setattr(FakeProbe, "poll", ticking_poll)
    args = command + (["--out", str(tmp_path)] if command[0] == "report" else [])
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert 9 <= FakeProbe.instances[0].polls <= 11


def test_stat_tracker_tells_a_recycled_namespace_inode_apart(monkeypatch):
    """The kernel recycles netns inode numbers: a namespace deleted during a capture and a new
    one with the same inode must not share a baseline."""
    world = {"map": {77: {"names": ["old"], "pids": []}},
             "stat": {"old": {"invalid": 500}, "new": {"invalid": 0}}}
    monkeypatch.setattr(cli_mod.sysctl, "netns_map", lambda: world["map"])
    monkeypatch.setattr(cli_mod.sysctl, "read_conntrack_stat_of",
                        lambda ino, nsmap: dict(world["stat"][nsmap[ino]["names"][0]]))
    stats = cli_mod.StatTracker(world["map"], own=None)
    stats.scan()                                   # "old" existed before: baseline 500
    world["stat"]["old"]["invalid"] = 520
    assert stats.delta([77]) == 20
    # "old" is deleted; "new" gets inode 77 and counts 7 invalids while we watch
    world["map"] = {77: {"names": ["new"], "pids": []}}
    world["stat"]["new"]["invalid"] = 7
    assert stats.capture_delta([77])["invalid"] == 7
    assert stats.since_start() == 20


def test_sigint_stops_even_when_the_shell_started_us_with_it_ignored():
    """`conntrace top &` in a script starts with SIGINT ignored; kill -INT must still work."""
    import signal as sig
    before = sig.signal(sig.SIGINT, sig.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            with cli_mod.stop_on_signals():
                os.kill(os.getpid(), sig.SIGINT)
                for _ in range(1000):      # the handler runs between bytecodes
                    pass
        assert sig.getsignal(sig.SIGINT) == sig.SIG_IGN    # restored afterwards
    finally:
        sig.signal(sig.SIGINT, before)


def test_ctrl_c_during_a_batch_lets_the_batch_finish_then_stops():
    """Every event poll() returned is shown (or counted lost): Ctrl-C waits for the batch."""
    import signal as sig

    def sigint():
        os.kill(os.getpid(), sig.SIGINT)
        for _ in range(1000):      # the handler runs between bytecodes
            pass
    shown, batches = [], 0
    with cli_mod.stop_on_signals() as stop:
        while not stop.requested:
            batches += 1
            with stop.deferred():
                for i in range(5):
                    if i == 1:
                        sigint()
                    shown.append(i)
        assert shown == [0, 1, 2, 3, 4] and batches == 1
        with pytest.raises(KeyboardInterrupt):     # outside deferred(): at once
            sigint()
