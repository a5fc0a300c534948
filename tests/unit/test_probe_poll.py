"""Ctrl-C that lands inside the ring-buffer callback must still stop the command."""
import pytest

from conntrace import probe as probe_mod


class FakeBpf:
    def __init__(self, p):
        self.p = p

    def ring_buffer_poll(self, timeout_ms):
        self.p._on_event(None, None, 0)


def test_keyboard_interrupt_inside_the_callback_leaves_poll(monkeypatch):
    p = probe_mod.Probe(plan=None, events=True)
    p._bpf = FakeBpf(p)

    def interrupted(*a, **k):
        raise KeyboardInterrupt          # what Python's signal handler does mid-callback
    monkeypatch.setattr(probe_mod.ctypes, "string_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        p.poll(timeout_ms=1)
    # the next poll is normal again
    monkeypatch.setattr(probe_mod.ctypes, "string_at", lambda *a: b"")
    assert p.poll(timeout_ms=1) == []
    assert p.decode_errors == 1          # the empty record could not be decoded, and was counted
