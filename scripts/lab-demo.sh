#!/bin/sh
# `scripts/lab demo` runs this inside a lab guest: the seed story, caught by conntrace top.
#
# A client downloads 3 MB from a server behind a Linux stateful firewall
# (ct state invalid drop), through a middlebox that randomizes TCP sequence numbers
# but forgets to translate SACK blocks (like Cisco ASA/FTD "TCP sequence number
# randomization").  With be_liberal=0 the transfer stalls; conntrace top names the
# sender, the reason (SACK_OVER) and the remedy.  Then be_liberal=1 lets it complete.
cd "$(dirname "$0")/.." || exit 1
err=/tmp/conntrace-top.err
out=/tmp/conntrace-top.out
# conntrace attaches to nf_conntrack's functions, so the module must be there first
# (on a real firewall it is: its ruleset uses conntrack).
modprobe nf_conntrack || exit 1
echo "== conntrace top: compiling and attaching its BPF program (about a minute under emulation)"
# Into a file, not the guest's serial console: that is a terminal, and top would redraw in place.
python3 -m conntrace top --interval 5 > "$out" 2> "$err" &
top=$!
until grep -q "Hit Ctrl-C" "$err" 2>/dev/null; do
    if ! kill -0 "$top" 2>/dev/null; then cat "$err"; exit 1; fi
    sleep 1
done
cat "$err"
echo "== the middlebox story: be_liberal=0, then be_liberal=1"
python3 -m tests.lab.middlebox run --liberal both --size 3 --out /tmp/middlebox.json | grep "transfer time"
kill -TERM "$top"      # like Ctrl-C: detach, last refresh
wait "$top"
echo "== conntrace top, its last refresh (after Ctrl-C):"
# Print from the last header line on: each refresh starts with "HH:MM:SS  conntrace top".
awk '/conntrace top  rung:/ { block = "" } { block = block $0 "\n" } END { printf "%s", block }' "$out"
