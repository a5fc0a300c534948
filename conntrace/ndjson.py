"""Recorded files: NDJSON, one JSON object per line, every object with "schema" and "type".

Record types (see events.RECORD_*):
  meta     first line; conntrace version, host facts, kernel, ABI rung, per-netns sysctls
  event    one Event (Event.to_dict())
  lost     {"schema":1,"type":"lost","count":N,"total":T,"time":t}: N events lost since the
           previous lost record (T cumulative) between kernel and user space
  omitted  {"type":"omitted","netns","peer","reason","verdict","count","bytes"}: events that
           were counted but not written because the file is bounded (report)
  summary  last line; totals of the capture (events, lost, duration, filters)
  top      one `conntrace top --json` snapshot (not needed to replay)

The reader is strict per line and forgiving per file: a bad line is skipped and counted,
a file with no good record at all is an error naming the file and the first bad line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterable, Optional

from .events import (Event, SchemaError, check_schema, RECORD_EVENT, RECORD_META, RECORD_LOST,
                     RECORD_OMITTED, RECORD_SUMMARY, RECORD_TYPES, SCHEMA_VERSION)

MAX_LINE = 1 << 20   # a real record is < 4 KiB; a megabyte line is not ours


class RecordingError(Exception):
    """The recording cannot be used at all; str() is one line naming file and line."""


@dataclass
class Recording:
    path: str
    meta: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    lost: int = 0
    omitted: list = field(default_factory=list)      # omitted records (dicts)
    summary: Optional[dict] = None
    skipped: int = 0                                   # bad lines skipped
    first_skip: str = ""                               # "file:line: why" of the first one

    def skipped_note(self) -> str:
        if not self.skipped:
            return ""
        return (f"{self.path}: skipped {self.skipped} bad line{'s' if self.skipped != 1 else ''}"
                f" (first: {self.first_skip})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


def _need(ok: bool, key: str, want: str, value):
    if not ok:
        shown = repr(value)
        raise SchemaError(f"field '{key}' must be {want}, got "
                          f"{shown[:37] + '...' if len(shown) > 40 else shown}")


def _check_sysctls(d: dict, key: str = "sysctls"):
    v = d.get(key)
    if v is None:
        return
    _need(isinstance(v, dict), key, "an object", v)
    for ns, knobs in v.items():
        _need(ns.isdigit(), key, "keyed by netns inode", ns)
        _need(isinstance(knobs, dict) and all(isinstance(k, str) and (x is None or _is_int(x))
                                              for k, x in knobs.items()),
              f"{key}.{ns}", "an object of integers", knobs)


def _check_meta(d: dict) -> dict:
    """Facts replay relies on must have the right types; anything else is ignored."""
    for key in ("started",):
        if key in d:
            _need(_is_num(d[key]) and d[key] >= 0, key, "a time in seconds", d[key])
    for key in ("rung", "conntrace"):
        if key in d:
            _need(d[key] is None or isinstance(d[key], str), key, "a string", d[key])
    if "own_netns" in d:
        _need(d["own_netns"] is None or _is_int(d["own_netns"]), "own_netns", "an integer",
              d["own_netns"])
    host = d.get("host")
    if host is not None:
        _need(isinstance(host, dict), "host", "an object", host)
        for k in ("kernel", "rung", "distribution", "bcc", "conntrace", "python", "hostname"):
            if k in host:
                _need(host[k] is None or isinstance(host[k], str), f"host.{k}", "a string", host[k])
        for k in ("missing", "probes"):
            if k in host:
                _need(isinstance(host[k], list) and all(isinstance(x, str) for x in host[k]),
                      f"host.{k}", "a list of strings", host[k])
    names = d.get("netns_names")
    if names is not None:
        _need(isinstance(names, dict), "netns_names", "an object", names)
        for ns, entry in names.items():
            _need(ns.isdigit() and isinstance(entry, dict)
                  and isinstance(entry.get("names", []), list)
                  and all(isinstance(x, str) for x in entry.get("names", []))
                  and isinstance(entry.get("pids", []), list)
                  and all(_is_int(x) for x in entry.get("pids", [])),
                  f"netns_names.{ns}", "{names: [str], pids: [int]}", entry)
    _check_sysctls(d)
    return d


def _check_summary(d: dict) -> dict:
    for key in ("ended", "duration"):
        if key in d:
            _need(_is_num(d[key]) and d[key] >= 0, key, "a non-negative number", d[key])
    for key in ("lost", "events", "omitted", "filtered", "counted"):
        if key in d:
            _need(_is_int(d[key]) and d[key] >= 0, key, "a non-negative integer", d[key])
    _check_sysctls(d)
    delta = d.get("stat_delta")
    if delta is not None:
        _need(isinstance(delta, dict) and all(_is_int(x) for x in delta.values()), "stat_delta",
              "an object of integers", delta)
    rules = d.get("ruleset")
    if rules is not None:
        _need(isinstance(rules, list) and all(
            isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("tool", "context", "line"))
            for r in rules), "ruleset", "a list of {tool, context, line}", rules)
    notes = d.get("ruleset_notes")
    if notes is not None:
        _need(isinstance(notes, list) and all(isinstance(x, str) for x in notes), "ruleset_notes",
              "a list of strings", notes)
    return d


def _check_count(d: dict, key: str = "count") -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"field '{key}' must be a non-negative integer, got {value!r}")
    return value


def _check_omitted(d: dict) -> dict:
    _check_count(d)
    for key in ("first_seen", "last_seen", "bytes"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                              or v != v or v == float("inf")):
            raise SchemaError(f"field '{key}' must be a non-negative number, got {v!r}")
    for key in ("peer", "reason", "verdict"):
        if not isinstance(d.get(key), str):
            raise SchemaError(f"field '{key}' must be a string")
    if isinstance(d.get("netns"), bool) or not isinstance(d.get("netns"), int):
        raise SchemaError("field 'netns' must be an integer")
    return d


def parse_line(text: str):
    """Decode one line into (type, payload). Raises SchemaError/ValueError with a short reason."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise SchemaError(f"a JSON {type(d).__name__}, not an object")
    check_schema(d)
    rtype = d.get("type", RECORD_EVENT)
    if rtype not in RECORD_TYPES:
        raise SchemaError(f"unknown record type {rtype!r}")
    if rtype == RECORD_EVENT:
        return rtype, Event.from_dict(d)
    if rtype == RECORD_META:
        return rtype, _check_meta(d)
    if rtype == RECORD_LOST:
        _check_count(d)
        return rtype, d
    if rtype == RECORD_OMITTED:
        return rtype, _check_omitted(d)
    if rtype == RECORD_SUMMARY:
        return rtype, _check_summary(d)
    return rtype, d


def read_recording(path: str) -> Recording:
    """Read a whole recording; RecordingError when nothing in it is usable."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise RecordingError(f"{path}: cannot open: {e.strerror or e}") from None
    with fh:
        return read_stream(fh, path)


def read_stream(fh: IO[bytes], path: str) -> Recording:
    rec = Recording(path=path)
    good = 0
    lineno = 0
    try:
        for lineno, raw in enumerate(_lines(fh), start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                if len(raw) > MAX_LINE:
                    raise ValueError(f"line longer than {MAX_LINE} bytes")
                text = raw.decode("utf-8")
                rtype, payload = parse_line(text)
            except UnicodeDecodeError:
                rec.skipped += 1
                rec.first_skip = rec.first_skip or f"{where}: binary data, not UTF-8 text"
                continue
            except SchemaError as e:
                if "newer conntrace" in str(e):
                    # Skipping would silently drop the whole file: refuse instead.
                    raise RecordingError(f"{where}: {e}") from None
                rec.skipped += 1
                rec.first_skip = rec.first_skip or f"{where}: {e}"
                continue
            except ValueError as e:
                rec.skipped += 1
                rec.first_skip = rec.first_skip or f"{where}: {e}"
                continue
            good += 1
            if rtype == RECORD_EVENT:
                rec.events.append(payload)
            elif rtype == RECORD_META:
                if not rec.meta:
                    rec.meta = payload
            elif rtype == RECORD_LOST:
                rec.lost += payload["count"]
            elif rtype == RECORD_OMITTED:
                rec.omitted.append(payload)
            elif rtype == RECORD_SUMMARY:
                rec.summary = payload
    except OSError as e:
        raise RecordingError(f"{path}:{lineno + 1}: read error: {e.strerror or e}") from None
    if not rec.lost and rec.summary and isinstance(rec.summary.get("lost"), int) \
            and not isinstance(rec.summary.get("lost"), bool) and rec.summary["lost"] > 0:
        rec.lost = rec.summary["lost"]       # a writer that only put the total in the trailer
    if good == 0:
        if lineno == 0 or not rec.skipped:
            raise RecordingError(f"{path}: empty file, no conntrace records")
        raise RecordingError(f"{rec.first_skip} (no usable record in the file)")
    return rec


def _lines(fh: IO[bytes]) -> Iterable[bytes]:
    # readline with a cap so a gigabyte of garbage without newlines cannot exhaust memory
    while True:
        line = fh.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            # drain the rest of this overlong line
            while True:
                more = fh.readline(MAX_LINE)
                if not more or more.endswith(b"\n"):
                    break
        yield line


class Writer:
    """Writes records as they come, flushed per line so a killed capture keeps its data."""

    def __init__(self, path: str, anonymizer=None):
        self.path = path
        self.anonymizer = anonymizer
        try:
            self.fh = open(path, "w", encoding="utf-8")
        except OSError as e:
            raise RecordingError(f"{path}: cannot write: {e.strerror or e}") from None
        self.lost_total = 0

    def _write(self, d: dict):
        if self.anonymizer is not None:
            d = self.anonymizer.record(d)
        # default=str: host facts may carry odd types (paths, sets); never fail a capture on them
        self.fh.write(json.dumps(d, separators=(",", ":"), default=str) + "\n")
        self.fh.flush()

    def meta(self, **facts):
        self._write({"schema": SCHEMA_VERSION, "type": RECORD_META, **facts})

    def event(self, ev: Event):
        self._write(ev.to_dict())

    def lost(self, count: int, when: float):
        self.lost_total += count
        self._write({"schema": SCHEMA_VERSION, "type": RECORD_LOST, "count": count,
                     "total": self.lost_total, "time": when})

    def omitted(self, netns: int, peer: str, reason: str, verdict: str, count: int, nbytes: int = 0,
                first_seen: Optional[float] = None, last_seen: Optional[float] = None):
        d = {"schema": SCHEMA_VERSION, "type": RECORD_OMITTED, "netns": netns, "peer": peer,
             "reason": reason, "verdict": verdict, "count": count, "bytes": nbytes}
        if first_seen:
            d["first_seen"], d["last_seen"] = first_seen, last_seen or first_seen
        self._write(d)

    def summary(self, **totals):
        self._write({"schema": SCHEMA_VERSION, "type": RECORD_SUMMARY, **totals})

    def raw(self, d: dict):
        self._write(d)

    def close(self):
        if not self.fh.closed:
            self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dumps(d: dict) -> str:
    return json.dumps(d, separators=(",", ":"), default=str)


def is_readable_path(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)
