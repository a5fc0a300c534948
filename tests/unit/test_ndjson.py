import json
import os

import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

from conntrace.ndjson import Writer, RecordingError, read_recording, read_stream, parse_line
from event_factory import make_event, MIDDLEBOX


def write_lines(tmp_path, lines, name="rec.ndjson"):
    p = tmp_path / name
    p.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return str(p)


def test_writer_reader_roundtrip(tmp_path):
    path = str(tmp_path / "r.ndjson")
    evs = [make_event(seq=i) for i in range(5)]
    with Writer(path) as w:
        w.meta(host={"kernel": "6.1.0"}, rung="deferred")
        for e in evs:
            w.event(e)
        w.lost(3, 1.0)
        w.lost(2, 2.0)
        w.omitted(4026531840, "203.0.113.7", "SEQ_OVER", "invalid", 7, 100)
        w.summary(events=5)
    rec = read_recording(path)
    assert rec.events == evs
    assert rec.meta["rung"] == "deferred"
    assert rec.lost == 5
    assert rec.omitted[0]["count"] == 7
    assert rec.summary["events"] == 5
    assert rec.skipped == 0
    # every line carries schema and type
    for line in open(path):
        d = json.loads(line)
        assert d["schema"] == 1 and "type" in d


def test_fixture_reads_cleanly():
    rec = read_recording(MIDDLEBOX)
    assert len(rec.events) == 82 and rec.lost == 3 and rec.skipped == 0


def test_bad_lines_are_skipped_and_counted(tmp_path):
    good = json.dumps(make_event().to_dict())
    path = write_lines(tmp_path, [good, "{not json", good[: len(good) // 2], b"\xff\xfe\x00garbage",
                                  json.dumps(dict(make_event().to_dict(), seq="x")), "[1,2]", good])
    rec = read_recording(path)
    assert len(rec.events) == 2
    assert rec.skipped == 5
    assert rec.first_skip.startswith(f"{path}:2: not JSON")
    assert "skipped 5 bad lines" in rec.skipped_note()


def test_all_bad_is_an_error_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path, ["", "hello"])
    with pytest.raises(RecordingError) as e:
        read_recording(path)
    assert f"{path}:2:" in str(e.value) and "\n" not in str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.ndjson"
    p.write_bytes(b"")
    with pytest.raises(RecordingError, match="empty file"):
        read_recording(str(p))


def test_unreadable_and_missing_paths(tmp_path):
    with pytest.raises(RecordingError, match="cannot open"):
        read_recording(str(tmp_path / "nope.ndjson"))
    with pytest.raises(RecordingError, match="cannot open"):
        read_recording(str(tmp_path))          # a directory


def test_binary_garbage(tmp_path):
    p = tmp_path / "bin"
    p.write_bytes(os.urandom(4096).replace(b"\n", b"x"))
    with pytest.raises(RecordingError):
        read_recording(str(p))


def test_newer_schema_is_refused_not_skipped(tmp_path):
    d = make_event().to_dict()
    d["schema"] = 99
    path = write_lines(tmp_path, [json.dumps(make_event().to_dict()), json.dumps(d)])
    with pytest.raises(RecordingError, match=r":2: schema 99 was written by a newer conntrace"):
        read_recording(path)


def test_unknown_record_type_is_skipped(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"schema": 1, "type": "wat"}),
                                  json.dumps(make_event().to_dict())])
    rec = read_recording(path)
    assert rec.skipped == 1 and "unknown record type" in rec.first_skip


def test_lost_record_needs_a_count():
    with pytest.raises(Exception):
        parse_line(json.dumps({"schema": 1, "type": "lost", "count": -1}))


# ---- property-based: the reader never crashes, whatever the bytes -------------------------

def _read_bytes(data: bytes):
    import io
    try:
        rec = read_stream(io.BytesIO(data), "fuzz.ndjson")
    except RecordingError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.ndjson")
        return None
    return rec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data):
    _read_bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(make_event().to_dict())), json_values)
def test_fuzz_one_field_of_a_valid_event(key, value):
    d = make_event().to_dict()
    d[key] = value
    good = json.dumps(make_event().to_dict()).encode()
    rec = _read_bytes(json.dumps(d).encode() + b"\n" + good + b"\n")
    if rec is None:                         # only a newer schema refuses the whole file
        assert key == "schema"
        return
    assert len(rec.events) + rec.skipped == 2 and rec.events


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=400))
def test_fuzz_truncated_lines(cut):
    line = json.dumps(make_event().to_dict()).encode()
    rec = _read_bytes(line + b"\n" + line[:cut])
    assert rec is not None and len(rec.events) >= 1


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, max_size=5))
def test_fuzz_json_lines(values):
    _read_bytes(b"\n".join(json.dumps(v).encode() for v in values))


def test_lost_total_from_the_summary_when_no_lost_records(tmp_path):
    path = write_lines(tmp_path, [json.dumps(make_event().to_dict()),
                                  json.dumps({"schema": 1, "type": "summary", "lost": 4})])
    assert read_recording(path).lost == 4
