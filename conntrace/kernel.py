"""Facts about the running kernel: kallsyms, BTF, kernel config, sysctls, netns.

Everything the attach ladder needs comes from here, read from the kernel's own
files (never from ``uname -r``):

* ``kallsyms()``: which functions exist out of line (and in which module);
* ``Btf``: a small reader for /sys/kernel/btf/vmlinux and split module BTF
  (/sys/kernel/btf/nf_conntrack): types, struct members and their sizes, function
  prototypes (named parameters, varargs);
* ``kernel_config()``: /proc/config.gz or /boot/config-$(uname -r);
* ``kprobes_available()``: the kprobe PMU, tracefs kprobe_events, CONFIG_KPROBES;
* ``sysctls()``: the conntrack TCP knobs of the caller's network namespace.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

KALLSYMS = "/proc/kallsyms"
BTF_DIR = "/sys/kernel/btf"

# ---- kallsyms ----------------------------------------------------------------------


def kallsyms(path: str = KALLSYMS, names: Optional[set] = None) -> dict[str, str]:
    """{symbol: module} ("" for vmlinux).  Only text symbols (t/T).

    ``names`` restricts the result to those symbols (faster, smaller).  Addresses
    are ignored: without privileges they read as zero, names are still there.
    """
    out: dict[str, str] = {}
    with open(path, "r", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in ("t", "T"):
                continue
            name = parts[2]
            if names is not None and name not in names:
                continue
            module = parts[3].strip("[]") if len(parts) > 3 else ""
            out.setdefault(name, module)
    return out


# ---- BTF ---------------------------------------------------------------------------

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO = 8, 9, 10, 11, 12, 13
KIND_VAR, KIND_DATASEC, KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 14, 15, 16, 17, 18, 19

# bytes of kind-specific data after the 12-byte btf_type: fixed, or per vlen item
_EXTRA_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_EXTRA_PER_VLEN = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8,
                   KIND_DATASEC: 12, KIND_ENUM64: 12}


class BtfError(Exception):
    pass


@dataclass
class FuncProto:
    name: str
    params: list            # parameter names; "" for unnamed
    variadic: bool          # last parameter is "..." (type 0, no name)

    @property
    def named(self) -> int:
        return len(self.params)


@dataclass
class Btf:
    """Types of one BTF blob, optionally split on top of a base (vmlinux)."""
    path: str = ""
    base: Optional["Btf"] = None
    _data: bytes = b""
    _types: list = field(default_factory=list)   # (kind, name_off, info, size_or_type, extra_off)
    _strs: bytes = b""
    _first_id: int = 1
    _by_name: dict = field(default_factory=dict)  # (kind, name) -> id

    @classmethod
    def load(cls, path: str, base: Optional["Btf"] = None) -> "Btf":
        data = Path(path).read_bytes()
        return cls.parse(data, base=base, path=path)

    @classmethod
    def parse(cls, data: bytes, base: Optional["Btf"] = None, path: str = "") -> "Btf":
        if len(data) < 24:
            raise BtfError(f"{path}: too short for BTF")
        magic, version, flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{path}: not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        b = cls(path=path, base=base, _data=data)
        b._strs = data[hdr_len + str_off:hdr_len + str_off + str_len]
        b._first_id = base._first_id + len(base._types) if base else 1
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        types = b._types
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, size_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            extra = pos + 12
            types.append((kind, name_off, info, size_type, extra))
            pos = extra + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_VLEN.get(kind, 0) * vlen
            if kind in (KIND_STRUCT, KIND_UNION, KIND_FUNC, KIND_ENUM, KIND_TYPEDEF, KIND_ENUM64) and name_off:
                b._by_name.setdefault((kind, b._str(name_off)), b._first_id + len(types) - 1)
        return b

    # -- strings and ids
    def _str(self, off: int) -> str:
        if self.base is not None:
            base_len = self.base._str_total()
            if off < base_len:
                return self.base._str(off)
            off -= base_len
        end = self._strs.find(b"\0", off)
        return self._strs[off:end].decode("utf-8", "replace")

    def _str_total(self) -> int:
        return (self.base._str_total() if self.base else 0) + len(self._strs)

    def _type(self, tid: int):
        if tid < self._first_id:
            if self.base is None:
                raise BtfError(f"type id {tid} not in {self.path}")
            return self.base, self.base._type(tid)[1]
        return self, self._types[tid - self._first_id]

    def find(self, kind: int, name: str) -> Optional[int]:
        tid = self._by_name.get((kind, name))
        if tid is None and self.base is not None:
            return self.base.find(kind, name)
        return tid

    # -- queries
    def has_struct(self, name: str) -> bool:
        return self.find(KIND_STRUCT, name) is not None

    def has_enum(self, name: str) -> bool:
        return self.find(KIND_ENUM, name) is not None or self.find(KIND_ENUM64, name) is not None

    def type_size(self, tid: int) -> Optional[int]:
        """Size in bytes of a type, following typedef/const/volatile/restrict/type_tag."""
        for _ in range(32):
            if tid == 0:
                return None
            owner, (kind, _n, _i, size_type, _e) = self._type(tid)
            if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_DATASEC):
                return size_type
            if kind == KIND_PTR:
                return 8
            if kind == KIND_ARRAY:
                elem, _idx, nelems = struct.unpack_from("<III", owner._data, _e)
                es = self.type_size(elem)
                return None if es is None else es * nelems
            if kind in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG):
                tid = size_type
                continue
            return None
        return None

    def members(self, struct_name: str) -> Optional[dict]:
        """{member: (byte offset, size)} of a struct, or None if the struct is unknown."""
        tid = self.find(KIND_STRUCT, struct_name)
        if tid is None:
            return None
        owner, (kind, _n, info, _s, extra) = self._type(tid)
        out = {}
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = struct.unpack_from("<III", owner._data, extra + 12 * i)
            bits = offset & 0xFFFFFF if kflag else offset
            out[self._str(name_off)] = (bits // 8, self.type_size(mtype))
        return out

    def func_proto(self, name: str) -> Optional[FuncProto]:
        """Named parameters of a function (BTF FUNC -> FUNC_PROTO), or None."""
        tid = self.find(KIND_FUNC, name)
        if tid is None:
            return None
        _owner, (_k, _n, _i, proto_id, _e) = self._type(tid)
        owner, (kind, _n2, info, _ret, extra) = self._type(proto_id)
        if kind != KIND_FUNC_PROTO:
            return None
        params, variadic = [], False
        for i in range(info & 0xFFFF):
            name_off, ptype = struct.unpack_from("<II", owner._data, extra + 8 * i)
            if ptype == 0 and name_off == 0:
                variadic = True
                continue
            params.append(self._str(name_off))
        return FuncProto(name, params, variadic)


def load_btf(module: Optional[str] = None, btf_dir: str = BTF_DIR) -> Optional[Btf]:
    """vmlinux BTF, with ``module``'s split BTF on top when it exists; None without BTF."""
    vmlinux = os.path.join(btf_dir, "vmlinux")
    if not os.path.exists(vmlinux):
        return None
    base = Btf.load(vmlinux)
    if module:
        mod = os.path.join(btf_dir, module)
        if os.path.exists(mod):
            return Btf.load(mod, base=base)
    return base


# ---- kernel config, kprobes, lockdown ---------------------------------------------------


def kernel_config(release: Optional[str] = None) -> dict[str, str]:
    """CONFIG_* from /proc/config.gz or /boot/config-<release>; {} when neither exists."""
    release = release or os.uname().release
    text = ""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        try:
            text = Path(f"/boot/config-{release}").read_text()
        except OSError:
            return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
        else:
            m = re.match(r"^# (CONFIG_\w+) is not set", line)
            if m:
                out[m.group(1)] = "n"
    return out


TRACEFS_KPROBE_EVENTS = ("/sys/kernel/tracing/kprobe_events", "/sys/kernel/debug/tracing/kprobe_events")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"


def kprobes_available() -> tuple[Optional[bool], str]:
    """(True/False/None=unknown, evidence).  BCC attaches through the kprobe PMU or tracefs."""
    if os.path.isdir(KPROBE_PMU):
        return True, f"{KPROBE_PMU} exists"
    for p in TRACEFS_KPROBE_EVENTS:
        if os.path.exists(p):
            return True, f"{p} exists"
    cfg = kernel_config()
    if cfg:
        if cfg.get("CONFIG_KPROBES") == "y" and cfg.get("CONFIG_KPROBE_EVENTS") == "y":
            return True, "CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y (tracefs not mounted)"
        missing = [k for k in ("CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS") if cfg.get(k) != "y"]
        return False, f"{' and '.join(missing)} not set in the kernel config"
    return False, f"no {KPROBE_PMU}, no tracefs kprobe_events and no kernel config to check"


def lockdown() -> Optional[str]:
    """The active lockdown mode ("none", "integrity", "confidentiality"), None if unknown."""
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


# ---- conntrack presence, sysctls, netns --------------------------------------------------

SYSCTL_DIR = "/proc/sys/net/netfilter"
KNOBS = ("nf_conntrack_tcp_be_liberal", "nf_conntrack_tcp_loose", "nf_conntrack_tcp_ignore_invalid_rst",
         "nf_conntrack_log_invalid", "nf_conntrack_checksum", "nf_log_all_netns")


def conntrack_loaded(syms: Optional[dict] = None) -> bool:
    if os.path.exists("/proc/net/stat/nf_conntrack") or os.path.isdir("/sys/module/nf_conntrack"):
        return True
    syms = syms if syms is not None else kallsyms(names={"nf_conntrack_in"})
    return "nf_conntrack_in" in syms


def sysctls(root: str = SYSCTL_DIR) -> dict[str, Optional[int]]:
    """The conntrack knobs of this process's netns (None when absent)."""
    out: dict[str, Optional[int]] = {}
    for k in KNOBS:
        try:
            out[k] = int(Path(root, k).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            out[k] = None
    return out


def netns_inode(pid: str | int = "self") -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def conntrack_invalid_total(path: str = "/proc/net/stat/nf_conntrack") -> Optional[int]:
    """Sum over CPUs of the ``invalid`` column (hex) of /proc/net/stat/nf_conntrack."""
    try:
        lines = Path(path).read_text().split("\n")
    except OSError:
        return None
    head = lines[0].split()
    if "invalid" not in head:
        return None
    col = head.index("invalid")
    return sum(int(l.split()[col], 16) for l in lines[1:] if l.strip())


def headers_dir(release: Optional[str] = None) -> Optional[str]:
    """Where BCC will find kernel headers, or None."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and os.path.isdir(env):
        return env
    release = release or os.uname().release
    build = f"/lib/modules/{release}/build"
    if os.path.isdir(build):
        return build
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None
