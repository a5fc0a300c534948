import ipaddress
import json
import os
import re

from click.testing import CliRunner

from conntrace.anonymize import Anonymizer
from conntrace.cli import cli
from event_factory import make_event, MIDDLEBOX

ADDR_RE = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{0,4}){2,7}")


def original_addresses(path):
    """Every IP address written anywhere in the recording (fields, messages, rulesets)."""
    found = set()
    for token in ADDR_RE.findall(open(path).read()):
        try:
            found.add(str(ipaddress.ip_address(token)))
        except ValueError:
            pass
    return found


def contains(text, addr):
    return re.search(r"(?<![\w.:])" + re.escape(addr) + r"(?![\w:]|\.\d)", text) is not None


def test_same_address_same_pseudonym_and_reserved_ranges():
    a = Anonymizer(key=b"k" * 32)
    p1, p2 = a.address("203.0.113.7"), a.address("203.0.113.7")
    assert p1 == p2 and p1 != "203.0.113.7"
    assert ipaddress.ip_address(p1) in ipaddress.ip_network("240.0.0.0/4")
    v6 = a.address("2001:db8::1")
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00::/8")
    assert a.address("2001:0db8:0::1") == v6            # same address, other spelling
    assert a.address(p1) == p1                           # pseudonyms are not re-mapped
    assert a.address("") == "" and a.address("web") == "web"


def test_different_runs_give_different_pseudonyms():
    assert Anonymizer().address("203.0.113.7") != Anonymizer().address("203.0.113.7")


def test_prefix_preservation_keeps_groupings():
    a = Anonymizer(keep_prefix=24, key=b"x" * 32)
    x, y, z = a.address("198.51.100.1"), a.address("198.51.100.200"), a.address("198.51.101.1")
    net = lambda s: ipaddress.ip_network(s + "/24", strict=False)
    assert net(x) == net(y) != net(z)
    assert x != y
    b = Anonymizer(keep_prefix=48, key=b"x" * 32)
    p, q = b.address("2001:db8:1::1"), b.address("2001:db8:1::2")
    assert ipaddress.ip_network(p + "/48", strict=False) == ipaddress.ip_network(q + "/48",
                                                                                 strict=False)


def test_scrub_finds_addresses_in_text_but_not_times_or_macs():
    a = Anonymizer(key=b"k" * 32)
    text = ("08:00:01 SRC=203.0.113.7 DST=10.0.0.5 [2001:db8::1]:443 MAC=aa:bb:cc:dd:ee:ff "
            "-s 198.51.100.0/24 ::ffff:192.0.2.1 version 6.1.0-41")
    out = a.scrub(text)
    for orig in ("203.0.113.7", "10.0.0.5", "2001:db8::1", "198.51.100.0", "192.0.2.1"):
        assert orig not in out
    assert "08:00:01" in out and "aa:bb:cc:dd:ee:ff" in out and "6.1.0-41" in out
    assert a.scrub(out) == out                               # idempotent


def test_event_anonymized_everywhere_including_message():
    a = Anonymizer()
    ev = make_event(message="SEQ is over upper bound 1001 SRC=203.0.113.7 DST=10.0.0.5")
    anon = a.event(ev)
    blob = json.dumps(anon.to_dict())
    assert "203.0.113.7" not in blob and "10.0.0.5" not in blob
    assert anon.orig.src == anon.reply.dst == anon.daddr
    assert anon.seq == ev.seq


def test_record_drops_hostnames():
    a = Anonymizer()
    assert a.record({"host": {"hostname": "edge-gw-01", "kernel": "6.1"}}) == {"host": {"kernel": "6.1"}}


def test_no_original_address_remains_in_any_written_file(tmp_path):
    originals = original_addresses(MIDDLEBOX)
    assert {"203.0.113.7", "10.0.0.5", "2001:db8:40::25", "203.0.113.0"} <= originals
    runner = CliRunner()
    out = tmp_path / "report"
    r1 = runner.invoke(cli, ["report", "--from", MIDDLEBOX, "--anonymize", "--out", str(out)])
    assert r1.exit_code == 0, r1.output
    rec = tmp_path / "trace.ndjson"
    r2 = runner.invoke(cli, ["trace", "--from", MIDDLEBOX, "--anonymize", "--write", str(rec)])
    assert r2.exit_code == 0, r2.output
    r3 = runner.invoke(cli, ["top", "--from", MIDDLEBOX, "--anonymize"])
    r4 = runner.invoke(cli, ["advise", "--from", MIDDLEBOX, "--anonymize"])
    r5 = runner.invoke(cli, ["trace", "--from", MIDDLEBOX, "--anonymize", "--json"])
    r6 = runner.invoke(cli, ["report", "--from", str(out / "events.ndjson"), "--out",
                             str(tmp_path / "again")])
    texts = {"stdout " + str(i): r.output for i, r in enumerate((r1, r2, r3, r4, r5, r6))}
    for d in (out, tmp_path / "again"):
        for name in os.listdir(d):
            texts[str(d / name)] = (d / name).read_text()
    texts[str(rec)] = rec.read_text()
    assert len(texts) == 6 + 3 + 3 + 1
    for where, text in texts.items():
        for addr in originals:
            assert not contains(text, addr), f"{addr} left in {where}"
        assert "edge-gw-01" not in text, where
    # the report is still useful: same shape, pseudonymous peers
    rep = json.loads((out / "report.json").read_text())
    assert [a["rule"] for a in rep["advice"]] == ["seq-randomization", "be-liberal",
                                                  "ignore-invalid-rst"]
    assert all(p["peer"].startswith(("24", "25", "fd")) for p in rep["peers"])
    assert json.loads(open(out / "events.ndjson").readline())["anonymized"] is True
