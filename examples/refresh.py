"""Regenerate examples/*_example.txt by running conntrace on a recording.

    python3 examples/refresh.py [RECORDING]      (default: tests/fixtures/middlebox.ndjson)

Every output block in the examples is produced here by the real commands, so the files
can be refreshed from a lab run (`conntrace trace --write lab.ndjson` in the middlebox
scenario) without hand editing.  Times are shown in UTC.
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures",
                                                            "middlebox.ndjson")
SHOWN = "middlebox.ndjson" if len(sys.argv) == 1 else os.path.basename(REC)
ENV = dict(os.environ, TZ="UTC", COLUMNS="100", PYTHONPATH=ROOT)


LAB_REC = os.path.join(ROOT, "tests", "fixtures", "lab-6.1-variadic-scenarios.ndjson")


def run(args, head=None, tail=None, skip=None, rec=None):
    """Output of `conntrace ARGS` with the recording's path shortened, optionally cut."""
    rec = rec or REC
    shown_rec = SHOWN if rec == REC else os.path.basename(rec)
    argv = [sys.executable, "-m", "conntrace"] + [rec if a == "REC" else a for a in args]
    p = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT)
    out = (p.stderr + p.stdout).replace(rec, shown_rec).rstrip("\n").splitlines()
    shown = "# conntrace " + " ".join(shown_rec if a == "REC" else a for a in args)
    if head is not None and tail is not None and len(out) > head + tail:
        out = out[:head] + ["[...]"] + out[-tail:]
    elif head is not None and len(out) > head:
        out = out[:head] + ["[...]"]
    return "\n".join([shown] + out)


def write(name, parts):
    text = "\n".join(parts).rstrip() + "\n"
    with open(os.path.join(HERE, name), "w") as fh:
        fh.write(text)
    print(f"wrote examples/{name}")


NOTE = (f"The outputs below come from a recording ({SHOWN}: a hand-made capture that follows the\n"
        "kernel's formulas for a Debian 12 host on a 6.1 kernel), replayed with --from, so they\n"
        "need no root and no BPF. They will be refreshed from a real lab run (scripts/lab).\n"
        "Live runs look the same, without --from and with sudo.")


def trace_example():
    write("trace_example.txt", [
        "Demonstrations of conntrace trace.", "",
        "conntrace trace prints one line per TCP segment that netfilter conntrack marks INVALID,",
        "ignores, or accepts only because of nf_conntrack_tcp_be_liberal, with the reason first",
        "and the numbers the kernel compared. For example:", "",
        NOTE, "",
        run(["trace", "--from", "REC", "--count", "14"], head=24), "",
        "(the advice printed at the end is shown in advise_example.txt)", "",
        "Each line is one segment. REASON is conntrace's stable code for what the kernel logged",
        "(SACK_OVER: the kernel said \"ACK is over upper bound\" but the ACK number itself was in",
        "range; the SACK block's right edge was not). VERDICT is what the kernel did with it:",
        "invalid (ctstate INVALID: no NAT, matched by `ct state invalid` rules), ignored (passed,",
        "state not updated), liberal (accepted only because of be_liberal). PEER is the sender of",
        "the segment, LOCAL where it was going. ST is the conntrack TCP state (ES = ESTABLISHED),",
        "FLG the TCP flags. SEQ/ACK/SACK is the number the reason is about, BOUND the first value",
        "the kernel considered out of range (what 6.1+ kernels print as %u), and OFF-BY how many",
        "bytes beyond it the segment went (large distances are shown in MiB/GiB; --json is exact).", "",
        "Here 203.0.113.7 keeps sending SACK blocks about 500 MiB beyond anything the local host",
        "sent, while its ACK numbers are fine: the signature of a firewall that randomizes sequence",
        "numbers and forgets the SACK option. The advice at the end says so, with evidence.",
        "The footer counts events lost between the kernel and user space (a burst larger than",
        "the kernel's ring buffer and the --backlog of copied events that wait to be decoded):",
        "they are never silently dropped. Live, trace also counts every segment in the kernel,",
        "like `conntrace top`, and a last footer line gives those exact totals by reason",
        "(\"-- the kernel counted 40 000 while conntrace was attached: SEQ_OVER 40 000\"); the",
        "advice and a --write recording use them too.", "",
        "", "Filters narrow the output (peer CIDR, port, netns inode, reason, verdict):", "",
        run(["trace", "--from", "REC", "--reason", "INVALID_RST", "--count", "3"], head=5), "",
        "", "--json writes NDJSON: one event record per line (schema 1, type \"event\"), a",
        "{\"type\":\"lost\",\"count\":N,\"total\":T} record whenever events were lost, and a final",
        "summary record with the totals and the advice. --write FILE records the same NDJSON",
        "(plus a leading meta record with host facts and sysctls) while the table is shown:", "",
        run(["trace", "--from", "REC", "--json", "--count", "1"], head=1), "",
        "", "On a real kernel: this recording (tests/fixtures/lab-6.1-variadic-scenarios.ndjson) is",
        "`conntrace trace --write` in the lab on Debian's 6.1.176 (variadic ABI) while",
        "tests/lab/scenarios.py produced every reason, first with be_liberal=0, then =1 (window",
        "reasons become `liberal`: accepted only because of be_liberal; on this ABI conntrace",
        "still sees them), then the window reasons over IPv6. Each line matched the kernel's own",
        "nf_ct_proto_6 log line (reason, verdict, bound). The OVERSHOT scenario's connection",
        "teardown adds the ACK_UNDER/SEQ_UNDER lines after it: real kernel behaviour.", "",
        run(["trace", "--from", "REC"], head=45, rec=LAB_REC), "",
        "A recorded file replays anywhere: `conntrace trace --from FILE`, `conntrace top --from",
        "FILE`, `conntrace report --from FILE`. Add --anonymize to replace every address by a",
        "consistent pseudonym before sharing.", "",
        "", "USAGE:", "",
        run(["trace", "--help"]),
    ])


def top_example():
    write("top_example.txt", [
        "Demonstrations of conntrace top.", "",
        "conntrace top answers \"who is sending traffic my conntrack rejects, why, and how much?\"",
        "on one screen. Live, it reads an in-kernel map keyed by network namespace, sender, reason",
        "and verdict every --interval seconds (default 1), so its counts stay exact at any rate;",
        "on a terminal it refreshes in place, piped it prints one table per interval. Here, one",
        "final table from a recording:", "",
        NOTE, "",
        run(["top", "--from", "REC"]), "",
        "The header shows the kernel ABI rung conntrace attached with, the be_liberal, loose and",
        "ignore_invalid_rst settings of every namespace seen, conntrack's own invalid counter",
        "(/proc/net/stat/nf_conntrack, hex per CPU, summed), and losses: events lost on the way",
        "to user space and groups evicted from the full count map (then totals are lower bounds).",
        "", "Rows are sorted by INVALID/S: INVALID segments per second over the last interval (in",
        "a replay: averaged over the recording). TOP REASONS marks reasons that were not INVALID",
        "(ign: ignored, lib: accepted only by be_liberal). LOCAL (PROCESS) names the local",
        "endpoint, and live the owning process when the connection ends on this host.",
        "The shortest advice follows the table; `conntrace advise` gives the full text.", "",
        "", "--by regroups the same counts: pair (sender -> local endpoint), port, netns, reason:", "",
        run(["top", "--from", "REC", "--by", "pair"], head=11), "",
        "", "--json prints one snapshot record per interval ({\"type\":\"top\", ...}), e.g.:", "",
        run(["top", "--from", "REC", "--json"]), "",
        "", "USAGE:", "",
        run(["top", "--help"]),
    ])


def advise_example():
    write("advise_example.txt", [
        "Demonstrations of conntrace advise.", "",
        "conntrace advise turns what was seen into remedies, each with the evidence that",
        "triggered it (counts, peers, the numbers of a sample segment), a confidence, the exact",
        "command in the namespace where it happened, how to make it persistent, and what it",
        "gives up. Without --from it watches live for --duration seconds first.", "",
        NOTE, "",
        run(["advise", "--from", "REC"]), "",
        "Three findings here. The SACK_OVER segments from 203.0.113.7 all carry the same offset",
        "between SACK edge and ACK: a sequence-randomizing firewall (Cisco ASA/FTD) that does not",
        "translate SACK blocks; fix it there, or tolerate it with be_liberal in the host",
        "namespace. The invalid RSTs into the container namespace `web` are not covered by",
        "be_liberal at all: only nf_conntrack_tcp_ignore_invalid_rst helps, so the advice names",
        "that knob and says not to expect be_liberal to help. The late retransmissions from",
        "192.0.2.44 were IGNOREd by this 6.1 kernel (nothing dropped), so there is no advice",
        "for them.", "",
        "Nothing is changed unless you ask. --apply RULE writes one sysctl, in the namespace",
        "named by --netns (an `ip netns` name, a PID living in it, or a path; the host is PID 1),",
        "and prints the previous value and the command that undoes it:", "",
        "# conntrace advise --apply ignore-invalid-rst --netns web",
        "netns web (4026532451): net.netfilter.nf_conntrack_tcp_ignore_invalid_rst 0 -> 1",
        "undo: ip netns exec web sysctl -w net.netfilter.nf_conntrack_tcp_ignore_invalid_rst=0", "",
        "(--apply output shown from a run on a test namespace; it needs root.)", "",
        "Rules: be-liberal, seq-randomization, window-scale, ignore-invalid-rst, bad-checksum,",
        "asymmetric-routing, pre-6.1-under, liberal-remaining, liberal-accepting, entry-expired,",
        "bad-flags, only-ignored. --apply accepts be-liberal, ignore-invalid-rst and",
        "checksum-test (nf_conntrack_checksum=0, to test whether offloads are to blame).", "",
        "", "USAGE:", "",
        run(["advise", "--help"]),
    ])


def report_example():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "incident-42")
        first = run(["report", "--from", "REC", "--out", out]).replace(tmp + "/", "")
        with open(os.path.join(out, "report.md")) as fh:
            md = fh.read().rstrip("\n").splitlines()
        anon_dir = os.path.join(tmp, "for-vendor")
        anon = run(["report", "--from", "REC", "--anonymize", "--anonymize-keep-prefix", "24",
                    "--out", anon_dir]).replace(tmp + "/", "")
        with open(os.path.join(anon_dir, "report.md")) as fh:
            amd = [l for l in fh.read().splitlines() if l.startswith("| 40")][:4]
    write("report_example.txt", [
        "Demonstrations of conntrace report.", "",
        "conntrace report captures for --duration seconds (default 60; Ctrl-C ends early and",
        "still writes) and writes a bug-report bundle into --out DIR: report.md for people,",
        "report.json for tools, events.ndjson to replay (every event up to --max-events, then",
        "samples per peer and reason with counts of what was left out). --from FILE builds the",
        "same bundle from a recording, without root or BPF.", "",
        NOTE, "",
        first, "",
        "# cat incident-42/report.md",
        *md, "",
        "The host section names the kernel and the probe rung, so a reader knows which kernel",
        "messages and verdicts to expect. Sysctls are read in every namespace involved (entering",
        "it through /var/run/netns or a process living in it). The counters section compares",
        "conntrack's own invalid counter with what conntrace saw. Ruleset lines come from",
        "iptables-save -c, ip6tables-save -c and nft list ruleset in each namespace (missing",
        "tools are noted, not fatal).", "",
        "", "--anonymize replaces every IP address (fields, kernel messages, ruleset lines) by a",
        "consistent pseudonym in 240.0.0.0/4 or fd00::/8 and drops the hostname;",
        "--anonymize-keep-prefix 24 keeps /24 groupings recognisable:", "",
        anon,
        "# grep '^| 40' for-vendor/report.md", *amd, "",
        "", "USAGE:", "",
        run(["report", "--help"]),
    ])


if __name__ == "__main__":
    trace_example()
    top_example()
    advise_example()
    report_example()
