import os

import pytest

from conntrace import sysctl
from conntrace.sysctl import NetnsRef, SysctlError

STAT = """entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000002a  00000000 00000000 00000000 0000000a 00000010 00000000 00000000 00000000 00000000 00000001 00000000 00000000  00000000 00000000 00000000 00000000
0000002a  00000000 00000000 00000000 000000ff 00000001 00000000 00000000 00000000 00000000 00000002 00000000 00000000  00000000 00000000 00000000 00000000
"""


def test_stat_is_hex_summed_over_cpus_entries_taken_once():
    s = sysctl.parse_conntrack_stat(STAT)
    assert s["invalid"] == 0x0a + 0xff
    assert s["ignore"] == 0x11 and s["drop"] == 3
    assert s["entries"] == 0x2a


def test_stat_delta():
    a = sysctl.parse_conntrack_stat(STAT)
    b = dict(a, invalid=a["invalid"] + 5)
    d = sysctl.stat_delta(a, b)
    assert d["invalid"] == 5 and "entries" not in d
    assert sysctl.stat_delta(None, b) is None


def test_read_own_stat_file_if_present():
    s = sysctl.read_conntrack_stat()
    if os.path.exists("/proc/net/stat/nf_conntrack"):
        assert "invalid" in s
    else:
        assert s is None


def make_knobs(tmp_path, **values):
    for k, v in values.items():
        (tmp_path / k).write_text(f"{v}\n")
    return str(tmp_path)


def test_read_sysctls_absent_knobs_are_none(tmp_path):
    base = make_knobs(tmp_path, nf_conntrack_tcp_be_liberal=0, nf_conntrack_max=262144)
    k = sysctl.read_sysctls(None, base=base)
    assert k["nf_conntrack_tcp_be_liberal"] == 0 and k["nf_conntrack_max"] == 262144
    assert k["nf_conntrack_tcp_ignore_invalid_rst"] is None
    assert set(k) == set(sysctl.KNOBS)


def self_ref():
    return NetnsRef(path="/proc/self/ns/net", inode=1, is_self=True)


def test_apply_prints_previous_value_and_undo(tmp_path):
    base = make_knobs(tmp_path, nf_conntrack_tcp_be_liberal=0)
    ref = NetnsRef(path="/var/run/netns/web", inode=5, name="web", is_self=False)
    # run "inside" the namespace without entering it: the thread body is what we test
    orig = sysctl.in_netns
    sysctl.in_netns = lambda r, fn: fn()
    try:
        prev, undo = sysctl.apply_sysctl(ref, "nf_conntrack_tcp_be_liberal", 1, base=base)
    finally:
        sysctl.in_netns = orig
    assert prev == 0
    assert undo == "ip netns exec web sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=0"
    assert (tmp_path / "nf_conntrack_tcp_be_liberal").read_text().strip() == "1"


def test_apply_refuses_other_knobs_and_values(tmp_path):
    with pytest.raises(SysctlError, match="refusing"):
        sysctl.apply_sysctl(self_ref(), "nf_conntrack_max", 1, base=str(tmp_path))
    with pytest.raises(SysctlError, match="refusing"):
        sysctl.apply_sysctl(self_ref(), "nf_conntrack_tcp_be_liberal", 7, base=str(tmp_path))


def test_apply_says_when_the_knob_does_not_exist(tmp_path):
    with pytest.raises(SysctlError, match="does not exist"):
        sysctl.apply_sysctl(self_ref(), "nf_conntrack_tcp_ignore_invalid_rst", 1, base=str(tmp_path))


def test_exec_prefix_and_commands():
    assert NetnsRef("/var/run/netns/web", 5, name="web").exec_prefix() == "ip netns exec web "
    assert NetnsRef("/proc/42/ns/net", 5, pid=42).exec_prefix() == "nsenter --net=/proc/42/ns/net "
    assert self_ref().exec_prefix() == ""
    assert sysctl.sysctl_command(self_ref(), "nf_conntrack_checksum", 0) == \
        "sysctl -w net.netfilter.nf_conntrack_checksum=0"


def test_resolve_netns_errors_are_one_line():
    with pytest.raises(SysctlError, match="no network namespace named 'nope-xyz'"):
        sysctl.resolve_netns("nope-xyz")
    with pytest.raises(SysctlError, match="no process 999999999"):
        sysctl.resolve_netns("999999999")
    with pytest.raises(SysctlError, match="does not exist"):
        sysctl.resolve_netns("/nonexistent/ns")
    with pytest.raises(SysctlError, match="empty"):
        sysctl.resolve_netns(" ")


def test_resolve_own_netns_by_pid_and_path():
    ref = sysctl.resolve_netns(str(os.getpid()))
    assert ref.is_self and ref.pid == os.getpid()
    assert sysctl.resolve_netns(f"/proc/{os.getpid()}/ns/net").is_self


def test_in_netns_self_runs_here():
    assert sysctl.in_netns(None, lambda: 42) == 42
    assert sysctl.in_netns(self_ref(), lambda: 43) == 43


def test_in_netns_reports_failures_in_one_line(tmp_path):
    bogus = NetnsRef(path=str(tmp_path / "missing"), inode=9, name="gone")
    with pytest.raises(SysctlError, match="cannot enter netns gone"):
        sysctl.in_netns(bogus, lambda: 1)


def test_netns_map_from_a_fake_proc(tmp_path):
    proc, run = tmp_path / "proc", tmp_path / "run"
    for pid in ("1", "77"):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "net").write_text("")
    run.mkdir()
    os.link(proc / "77" / "ns" / "net", run / "web")      # same inode, like a bind mount
    m = sysctl.netns_map(str(proc), str(run))
    ino77 = os.stat(proc / "77" / "ns" / "net").st_ino
    assert m[ino77] == {"names": ["web"], "pids": [77]}
    ref = sysctl.ref_for_inode(ino77, m)
    assert ref.name == "web" and ref.exec_prefix() == "ip netns exec web "
    assert sysctl.ref_for_inode(12345, m) is None


def test_run_tool_missing_is_a_note():
    ok, why = sysctl.run_tool(["conntrace-no-such-tool-xyz"])
    assert not ok and "not found" in why
    ok, out = sysctl.run_tool(["echo", "hi"])
    assert ok and out.strip() == "hi"


def test_stat_of_a_namespace_by_pid_or_not_at_all(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    monkeypatch.setattr(sysctl, "read_conntrack_stat",
                        lambda pid=None, path=None: sysctl.parse_conntrack_stat(STAT) if pid == 77
                        else None)
    assert sysctl.read_conntrack_stat_of(5, {5: {"names": [], "pids": [76, 77]}})["invalid"] == 0x109
    assert sysctl.read_conntrack_stat_of(6, {}) is None
