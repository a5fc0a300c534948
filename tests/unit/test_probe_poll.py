"""The user-space side of the event path: copy out of the ring buffer at once, decode later,
count every record that does not become an event, and let Ctrl-C through."""
import ctypes

import pytest

from conntrace import probe as probe_mod


class FakeBpf:
    """Stands in for bcc.BPF's ring buffer: records queued by the test are handed to the
    callback, all of them per poll/consume call, as libbpf does."""

    def __init__(self, p):
        self.p = p
        self.queued: list[bytes] = []
        self.kernel_lost = 0
        self.polls = self.consumes = 0
        self.during_poll = None          # called once inside the next poll (a late arrival)

    def _deliver(self):
        batch, self.queued = self.queued, []
        for raw in batch:
            buf = ctypes.create_string_buffer(raw, len(raw))
            self.p._on_event(None, ctypes.addressof(buf), len(raw))

    def ring_buffer_poll(self, timeout_ms):
        self.polls += 1
        if self.during_poll:
            hook, self.during_poll = self.during_poll, None
            hook()
        self._deliver()

    def ring_buffer_consume(self):
        self.consumes += 1
        self._deliver()

    def __getitem__(self, name):
        assert name == "lost"
        return [[self.kernel_lost]]


@pytest.fixture
def probe(monkeypatch):
    """A started Probe over FakeBpf whose 'decode' turns b'n' into the int n (b'bad' fails)."""
    def parse(raw):
        if raw == b"bad":
            raise ValueError("short record")
        return raw
    monkeypatch.setattr(probe_mod, "parse_record", parse)
    monkeypatch.setattr(probe_mod, "decode_record", lambda rec, off: int(rec))
    monkeypatch.setattr(probe_mod, "record_knobs", lambda rec: None)
    p = probe_mod.Probe(plan=None, events=True, backlog=1000)
    p._bpf = FakeBpf(p)
    return p


def test_a_burst_larger_than_a_decode_slice_is_delivered_in_order(probe):
    probe._bpf.queued = [str(i).encode() for i in range(500)]
    got = []
    for _ in range(50):
        got += probe.poll(timeout_ms=1)
        if len(got) == 500:
            break
    assert got == list(range(500))
    assert probe.lost_events() == 0 and probe.backlog_len() == 0


def test_records_arriving_while_decoding_wait_in_the_backlog_not_the_ring(probe):
    probe._bpf.queued = [str(i).encode() for i in range(200)]
    probe._DECODE_SLICE = 10
    first = probe.poll(timeout_ms=0)      # zero budget: one slice, then back to the caller
    assert first == list(range(10))
    assert probe.backlog_len() == 190
    probe._bpf.queued = [b"1000", b"1001"]
    rest = []
    while probe.backlog_len() or probe._bpf.queued:
        rest += probe.poll(timeout_ms=0)
    assert rest == list(range(10, 200)) + [1000, 1001]
    # with a backlog the ring is drained without waiting
    assert probe._bpf.consumes >= 19


def test_a_full_backlog_counts_lost_and_so_does_the_kernel(probe):
    probe.backlog = 100
    probe._bpf.queued = [str(i).encode() for i in range(150)]
    probe._bpf.kernel_lost = 7
    probe._bpf.during_poll = None
    probe._bpf.ring_buffer_poll(0)        # the kernel hands over 150 records at once
    assert probe.backlog_len() == 100
    assert probe.lost_events() == 50 + 7
    got = []
    while probe.backlog_len():
        got += probe.poll(timeout_ms=5)
    assert got == list(range(100))


def test_undecodable_records_are_counted_not_raised(probe):
    probe._bpf.queued = [b"1", b"bad", b"2"]
    assert probe.poll(timeout_ms=1) == [1, 2]
    assert probe.decode_errors == 1
    assert probe.lost_events() == 1      # never silently: an undecodable record counts as lost


def test_discarded_backlog_counts_as_lost_and_survives_close(probe):
    probe._bpf.queued = [str(i).encode() for i in range(300)]
    probe._bpf.ring_buffer_poll(0)
    probe._bpf.kernel_lost = 3
    assert probe.discard_backlog() == 300
    assert probe.backlog_len() == 0
    probe._bpf.cleanup = lambda: None
    probe.close()
    assert probe.lost_events() == 303     # the kernel's count is kept after the maps are gone


def test_keyboard_interrupt_inside_the_callback_leaves_poll(probe, monkeypatch):
    probe._bpf.queued = [b"5"]
    real = probe_mod.ctypes.string_at

    def interrupted(*a, **k):
        raise KeyboardInterrupt           # what Python's signal handler does mid-callback
    monkeypatch.setattr(probe_mod.ctypes, "string_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe.poll(timeout_ms=1)
    # the next poll is normal again
    monkeypatch.setattr(probe_mod.ctypes, "string_at", real)
    probe._bpf.queued = [b"6"]
    assert probe.poll(timeout_ms=1) == [6]


def _interrupt_decoding_at(probe, monkeypatch, record: bytes):
    """A Ctrl-C arrives while poll() decodes `record`."""
    def decode(rec, off):
        if rec == record:
            raise KeyboardInterrupt
        return int(rec)
    monkeypatch.setattr(probe_mod, "decode_record", decode)
    with pytest.raises(KeyboardInterrupt):
        probe.poll(timeout_ms=1)


def test_keyboard_interrupt_while_decoding_keeps_what_was_decoded(probe, monkeypatch):
    probe._bpf.queued = [b"1", b"2", b"3"]
    _interrupt_decoding_at(probe, monkeypatch, b"3")
    assert probe.backlog_len() == 3       # 2 decoded, 1 still raw: none of them lost
    monkeypatch.setattr(probe_mod, "decode_record", lambda rec, off: int(rec))
    assert probe.poll(timeout_ms=1) == [1, 2, 3]


def test_a_run_cut_short_counts_decoded_but_unreturned_events_as_lost(probe, monkeypatch):
    probe._bpf.queued = [b"1", b"2", b"3", b"4"]
    _interrupt_decoding_at(probe, monkeypatch, b"3")
    # the CLI stops here: 1 and 2 were decoded but never shown, 3 and 4 never decoded
    assert probe.discard_backlog() == 4
    assert probe.lost_events() == 4 and probe.backlog_len() == 0
