"""Build Events for unit tests: a valid ESTABLISHED-flow event, fields overridable."""
import os

from conntrace.events import Event, Tuple, WindowSide

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
MIDDLEBOX = os.path.join(FIXTURES, "middlebox.ndjson")


def make_event(**kw) -> Event:
    base = dict(
        time=1795680000.0, netns=4026531840, reason="SEQ_OVER", verdict="invalid",
        message="SEQ is over upper bound 1001 (over the window of the receiver)",
        bound=1001, distance=5, family=4, saddr="203.0.113.7", sport=443,
        daddr="10.0.0.5", dport=51514, seq=1005, ack=5000, sack=None, win=501,
        win_scaled=501 << 7, flags="PA", payload=1448, dir="reply", ct_state="ESTABLISHED",
        ct_status=["SEEN_REPLY", "ASSURED"],
        orig=Tuple("10.0.0.5", 51514, "203.0.113.7", 443),
        reply=Tuple("203.0.113.7", 443, "10.0.0.5", 51514),
        seen=[WindowSide(td_end=5000, td_maxend=70000, td_maxwin=65535, td_maxack=900,
                         td_scale=7, flags=0x23),
              WindowSide(td_end=900, td_maxend=1000, td_maxwin=64128, td_maxack=5000,
                         td_scale=7, flags=0x23)],
        source="test")
    base.update(kw)
    return Event(**base)
