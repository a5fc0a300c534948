import json

import pytest

from conntrace.events import Event, SchemaError, SCHEMA_VERSION, REASONS, check_schema
from event_factory import make_event


def roundtrip(ev):
    return Event.from_dict(json.loads(json.dumps(ev.to_dict())))


def test_roundtrip_keeps_every_field():
    ev = make_event(sack=123, ct_status=["ASSURED"], bound_recomputed=1001)
    assert roundtrip(ev) == ev


def test_to_dict_has_schema_and_type_and_required_fields():
    d = make_event().to_dict()
    assert d["schema"] == SCHEMA_VERSION and d["type"] == "event"
    for key in ("time", "netns", "reason", "verdict", "message", "bound", "saddr", "sport", "daddr",
                "dport", "seq", "ack", "sack", "win", "flags", "dir", "ct_state", "seen"):
        assert key in d
    assert set(d["seen"][0]) == {"td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags"}


def test_event_without_type_is_read_as_event():
    d = make_event().to_dict()
    del d["type"]
    assert Event.from_dict(d).reason == "SEQ_OVER"


def test_ipv6_and_unreadable_packet():
    ev = make_event(family=6, saddr="2001:db8::1", daddr="2001:db8::2")
    assert roundtrip(ev).saddr == "2001:db8::1"
    ev0 = make_event(family=0, saddr="", daddr="")
    assert roundtrip(ev0).family == 0


def test_extra_keys_are_ignored():
    d = make_event().to_dict()
    d["from_the_future"] = {"x": 1}
    assert Event.from_dict(d).seq == 1005


@pytest.mark.parametrize("key,value,words", [
    ("seq", "1005", "seq' must be an integer"),
    ("seq", True, "seq' must be an integer"),
    ("seq", 2 ** 32, "between"),
    ("sport", -1, "between"),
    ("reason", "SEQ_WAY_OVER", "reason' must be one of"),
    ("verdict", "dropped", "verdict"),
    ("family", 5, "family"),
    ("saddr", "not-an-ip", "IP address"),
    ("time", float("nan"), "finite"),
    ("seen", [{}], "two objects"),
    ("ct_state", "SLEEPING", "ct_state"),
    ("bound", "12", "bound"),
    ("ct_status", "ASSURED", "list of strings"),
])
def test_wrong_types_are_refused_with_the_field_named(key, value, words):
    d = make_event().to_dict()
    d[key] = value
    with pytest.raises(SchemaError) as e:
        Event.from_dict(d)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_field_is_named():
    d = make_event().to_dict()
    del d["ack"]
    with pytest.raises(SchemaError, match="missing field 'ack'"):
        Event.from_dict(d)


def test_nested_window_field_is_named():
    d = make_event().to_dict()
    d["seen"][1]["td_scale"] = 15
    with pytest.raises(SchemaError, match=r"seen\[1\].td_scale"):
        Event.from_dict(d)
    d = make_event().to_dict()
    d["orig"]["sport"] = "x"
    with pytest.raises(SchemaError, match="orig.sport"):
        Event.from_dict(d)


def test_schema_versions():
    d = make_event().to_dict()
    newer = dict(d, schema=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaError, match="newer conntrace"):
        Event.from_dict(newer)
    with pytest.raises(SchemaError, match="no 'schema'"):
        Event.from_dict({k: v for k, v in d.items() if k != "schema"})
    with pytest.raises(SchemaError, match="older"):
        check_schema({"schema": 0})
    with pytest.raises(SchemaError, match="integer"):
        check_schema({"schema": "1"})


def test_not_an_event_record():
    with pytest.raises(SchemaError, match="not an event"):
        Event.from_dict({"schema": 1, "type": "lost", "count": 1})
    with pytest.raises(SchemaError, match="not an object"):
        Event.from_dict([1, 2])


def test_every_reason_roundtrips():
    for reason in REASONS:
        assert roundtrip(make_event(reason=reason)).reason == reason


def test_peer_is_the_sender():
    ev = make_event()
    assert ev.peer == ev.saddr and ev.is_window_reason


def test_to_dict_is_the_full_deep_record_and_shares_nothing():
    from dataclasses import asdict
    from event_factory import make_event
    ev = make_event()
    d = ev.to_dict()
    expected = asdict(ev)
    expected.update(schema=1, type="event")
    assert d == expected
    d["seen"][0]["td_end"] = -1
    d["orig"]["src"] = "x"
    assert ev.to_dict() == expected        # the Event is untouched
