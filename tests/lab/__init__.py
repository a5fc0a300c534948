"""The conntrace lab's scenario library (run as root, natively or inside `scripts/lab run`).

netlab     namespaces, veths, sysctls, nft firewall and the kernel oracle (log, stats, counter)
packets    hand-built Ethernet/IPv4/IPv6/TCP frames, options, checksums, AF_PACKET sockets
scenarios  one injected segment per conntrack INVALID reason: `python3 -m tests.lab.scenarios`
middlebox  the seq-randomizing, SACK-forgetting middlebox story: `python3 -m tests.lab.middlebox`

Standard library only: the same code runs on the host's Python 3.11 and a trixie guest's 3.13.
"""
