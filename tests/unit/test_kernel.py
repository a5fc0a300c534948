"""kernel facts and the attach ladder: synthetic BTF/kallsyms, and this host's real files."""
from __future__ import annotations

import os
import struct

import pytest

from conntrace import kernel
from conntrace.doctor import run_doctor
from conntrace.probe import AttachPlan, ProbeError, ProbeFilters, Probe, choose_rung, plan_attach


# ---- a tiny BTF writer ---------------------------------------------------------------------

class BtfWriter:
    def __init__(self, base_types: int = 0, base_strlen: int = 0):
        self.types = b""
        self.strs = b"" if base_strlen else b"\0"
        self.base_strlen = base_strlen
        self.next_id = base_types + 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = self.base_strlen + len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(self, kind, name, vlen, size_type, extra=b"", kflag=0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_type) + extra
        tid = self.next_id
        self.next_id += 1
        return tid

    def int_(self, name, size):
        return self.add(kernel.KIND_INT, name, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name, size, members):   # members: [(name, type, bit offset)]
        extra = b"".join(struct.pack("<III", self.s(n), t, o) for n, t, o in members)
        return self.add(kernel.KIND_STRUCT, name, len(members), size, extra)

    def func(self, name, params, variadic=False):   # params: [(name, type)]
        ps = [(self.s(n), t) for n, t in params] + ([(0, 0)] if variadic else [])
        proto = self.add(kernel.KIND_FUNC_PROTO, "", len(ps), 0, b"".join(struct.pack("<II", *p) for p in ps))
        return self.add(kernel.KIND_FUNC, name, 0, proto)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", kernel.BTF_MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strs))
        return hdr + self.types + self.strs


def vmlinux_btf(helper_args=4, u8_knobs=True, ignore_rst=True) -> kernel.Btf:
    w = BtfWriter()
    i32 = w.int_("int", 4)
    u8 = w.int_("unsigned char", 1)
    ptr = w.add(kernel.KIND_PTR, "", 0, i32)
    knob = u8 if u8_knobs else i32
    step = 8 if u8_knobs else 32
    members = [("tcp_loose", knob, 0), ("tcp_be_liberal", knob, step)]
    if ignore_rst:
        members.append(("tcp_ignore_invalid_rst", knob, 2 * step))
    w.struct_("nf_tcp_net", 12, members)
    names = ["skb", "ct", "state", "fmt"] if helper_args == 4 else ["skb", "ct", "fmt"]
    w.func("nf_ct_l4proto_log_invalid", [(n, ptr) for n in names], variadic=True)
    return kernel.Btf.parse(w.blob(), path="vmlinux")


def module_btf(base: kernel.Btf, deferred: bool) -> kernel.Btf:
    w = BtfWriter(base_types=len(base._types), base_strlen=len(base._strs))
    ptr = w.add(kernel.KIND_PTR, "", 0, 1)          # refers to base "int"
    if deferred:
        w.struct_("nf_tcp_invalid_log", 8, [("type", 1, 0), ("value", 1, 32)])
        w.func("nf_tcp_log_invalid", [(n, ptr) for n in ("skb", "ct", "state", "log")])
    else:
        w.func("nf_tcp_log_invalid", [(n, ptr) for n in ("skb", "ct", "state", "sender", "ret", "fmt")],
               variadic=True)
    return kernel.Btf.parse(w.blob(), base=base, path="nf_conntrack")


SYMS_61 = {"nf_conntrack_in": "nf_conntrack", "nf_tcp_log_invalid": "nf_conntrack",
           "nf_ct_l4proto_log_invalid": "nf_conntrack", "nf_l4proto_log_invalid": "nf_conntrack"}
SYMS_510 = {k: v for k, v in SYMS_61.items() if k != "nf_tcp_log_invalid"}


# ---- BTF reader --------------------------------------------------------------------------

def test_btf_reader_on_synthetic_split_btf():
    base = vmlinux_btf()
    mod = module_btf(base, deferred=True)
    assert mod.has_struct("nf_tcp_invalid_log") and not base.has_struct("nf_tcp_invalid_log")
    assert mod.has_struct("nf_tcp_net")                 # found through the base
    assert mod.members("nf_tcp_invalid_log") == {"type": (0, 4), "value": (4, 4)}
    assert base.members("nf_tcp_net")["tcp_be_liberal"] == (1, 1)
    fp = mod.func_proto("nf_tcp_log_invalid")
    assert fp.params == ["skb", "ct", "state", "log"] and not fp.variadic
    fp = mod.func_proto("nf_ct_l4proto_log_invalid")
    assert fp.named == 4 and fp.variadic
    assert mod.func_proto("no_such_function") is None


def test_btf_reader_int_knobs_on_510_layout():
    b = vmlinux_btf(helper_args=3, u8_knobs=False, ignore_rst=False)
    assert b.members("nf_tcp_net") == {"tcp_loose": (0, 4), "tcp_be_liberal": (4, 4)}


def test_btf_rejects_garbage():
    with pytest.raises(kernel.BtfError):
        kernel.Btf.parse(b"\0" * 64)


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF")
def test_btf_reader_on_this_kernel():
    b = kernel.load_btf("nf_conntrack")
    # layout the BPF program mirrors (reference §4.1)
    assert b.members("ip_ct_tcp_state") == {"td_end": (0, 4), "td_maxend": (4, 4), "td_maxwin": (8, 4),
                                           "td_maxack": (12, 4), "td_scale": (16, 1), "flags": (17, 1)}
    m = b.members("ip_ct_tcp")
    assert m["state"] == (40, 1) and m["last_win"] == (56, 2) and m["last_flags"] == (59, 1)
    assert b.type_size(b.find(kernel.KIND_STRUCT, "ip_ct_tcp")) == 60
    assert b.type_size(b.find(kernel.KIND_STRUCT, "nf_conntrack_tuple")) == 40
    fp = b.func_proto("nf_ct_l4proto_log_invalid")
    assert fp is None or fp.variadic


# ---- kallsyms ------------------------------------------------------------------------------

def test_kallsyms_parsing(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("0000000000000000 T nf_conntrack_in\t[nf_conntrack]\n"
                 "0000000000000000 t nf_tcp_log_invalid\t[nf_conntrack]\n"
                 "0000000000000000 t nf_tcp_log_invalid.cold\t[nf_conntrack]\n"
                 "0000000000000000 D some_data\n"
                 "ffffffff81000000 T _stext\n")
    syms = kernel.kallsyms(str(f))
    assert syms == {"nf_conntrack_in": "nf_conntrack", "nf_tcp_log_invalid": "nf_conntrack",
                    "nf_tcp_log_invalid.cold": "nf_conntrack", "_stext": ""}
    assert kernel.kallsyms(str(f), names={"_stext"}) == {"_stext": ""}


# ---- the ladder ----------------------------------------------------------------------------

def test_ladder_deferred():
    base = vmlinux_btf()
    plan = choose_rung(SYMS_61, module_btf(base, deferred=True))
    assert plan.rung == "deferred"
    assert plan.probes == ["kprobe:nf_tcp_log_invalid", "kprobe:nf_ct_l4proto_log_invalid",
                           "kprobe:nf_l4proto_log_invalid"]
    assert plan.abi["helper_has_state"] and plan.abi["ignore_invalid_rst"]
    assert any("be_liberal" in m for m in plan.missing)
    assert "-DCT_RUNG=3" in plan.cflags() and "-DCT_HELPER_STATE=1" in plan.cflags()


def test_ladder_variadic():
    plan = choose_rung(SYMS_61, module_btf(vmlinux_btf(), deferred=False))
    assert plan.rung == "variadic" and plan.missing == []
    assert "-DCT_RUNG=2" in plan.cflags()


def test_ladder_pre61_with_3_arg_helpers():
    plan = choose_rung(SYMS_510, vmlinux_btf(helper_args=3, u8_knobs=False, ignore_rst=False))
    assert plan.rung == "pre-6.1"
    assert plan.abi["helper_has_state"] is False and plan.abi["ignore_invalid_rst"] is False
    assert plan.cflags() == ["-DCT_RUNG=1", "-DCT_HELPER_STATE=0", "-DCT_HAVE_IGNORE_INVALID_RST=0"]
    assert "kprobe:nf_tcp_log_invalid" not in plan.probes


def test_ladder_pre61_helper_signature_from_nf_tcp_net_when_prototype_missing(monkeypatch):
    # Debian 5.10: nf_conntrack is a module without module BTF; the helper is not in vmlinux BTF
    monkeypatch.setattr(kernel, "headers_dir", lambda *a: None)
    w = BtfWriter()
    i32 = w.int_("int", 4)
    w.struct_("nf_tcp_net", 8, [("tcp_loose", i32, 0), ("tcp_be_liberal", i32, 32)])
    plan = choose_rung(SYMS_510, kernel.Btf.parse(w.blob()))
    assert plan.abi["helper_has_state"] is False and "guessed" in plan.abi["helper_evidence"]


def test_ladder_helper_signature_from_headers(monkeypatch, tmp_path):
    h = tmp_path / "include/net/netfilter"
    h.mkdir(parents=True)
    (h / "nf_conntrack_l4proto.h").write_text(
        "__printf(3, 4) __cold\nvoid nf_ct_l4proto_log_invalid(const struct sk_buff *skb,\n"
        "\t\t\t       const struct nf_conn *ct,\n\t\t\t       const char *fmt, ...);\n")
    monkeypatch.setattr(kernel, "headers_dir", lambda *a: str(tmp_path))
    plan = choose_rung(SYMS_510, None)
    assert plan.abi["helper_has_state"] is False and "headers" in plan.abi["helper_evidence"]


def test_ladder_inlined_deferred_and_missing_helpers():
    syms = {"nf_conntrack_in": "nf_conntrack", "nf_ct_l4proto_log_invalid": "nf_conntrack"}
    plan = choose_rung(syms, module_btf(vmlinux_btf(), deferred=True))
    assert plan.rung == "deferred" and plan.probes == ["kprobe:nf_ct_l4proto_log_invalid"]
    assert any("inlined" in m for m in plan.missing)
    assert any("nf_l4proto_log_invalid" in m and "tcp_error" in m for m in plan.missing)


def test_ladder_without_conntrack():
    with pytest.raises(ProbeError, match="modprobe nf_conntrack"):
        choose_rung({"_stext": ""}, None)


def test_ladder_unknown_nonvariadic_abi():
    base = vmlinux_btf()
    w = BtfWriter(base_types=len(base._types), base_strlen=len(base._strs))
    w.func("nf_tcp_log_invalid", [("skb", 1), ("x", 1)])
    with pytest.raises(ProbeError, match="unknown nf_tcp_log_invalid ABI"):
        choose_rung(SYMS_61, kernel.Btf.parse(w.blob(), base=base))


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF")
def test_ladder_on_this_host():
    """6.18.44 here: variadic nf_tcp_log_invalid, no deferred struct, 5.14+ helpers."""
    syms = kernel.kallsyms(names={"nf_conntrack_in", "nf_tcp_log_invalid"})
    if "nf_conntrack_in" not in syms:
        pytest.skip("conntrack not loaded")
    plan = plan_attach(check_kprobes=False)
    btf = kernel.load_btf("nf_conntrack")
    expect = ("deferred" if btf.has_struct("nf_tcp_invalid_log") else
              "variadic" if "nf_tcp_log_invalid" in syms else "pre-6.1")
    assert plan.rung == expect
    if expect == "variadic":
        assert btf.func_proto("nf_tcp_log_invalid").params == ["skb", "ct", "state", "sender", "ret", "fmt"]
    assert plan.abi["helper_has_state"] is True


@pytest.mark.skipif(kernel.kprobes_available()[0], reason="this kernel has kprobes")
def test_no_kprobes_is_a_one_line_error_and_doctor_fails():
    with pytest.raises(ProbeError) as exc:
        plan_attach()
    assert "kprobes are unavailable" in str(exc.value) and "\n" not in str(exc.value)
    lines = []
    assert run_doctor(lines.append) != 0
    assert any(l.startswith("FAIL  kprobes") for l in lines)
    assert lines[-1].startswith("conntrace trace cannot run here: kprobes unavailable")


# ---- probe arguments checked before any BPF ---------------------------------------------------

def test_probe_rejects_bad_arguments():
    plan = AttachPlan("variadic", ["kprobe:nf_tcp_log_invalid"], [], {"helper_has_state": True})
    with pytest.raises(ProbeError, match="power of two"):
        Probe(plan, ringbuf_pages=100)
    with pytest.raises(ProbeError, match="bad port filter"):
        Probe(plan, filters=ProbeFilters(port=70000)).cflags()
    flags = Probe(plan, aggregate=True, filters=ProbeFilters(netns=4026531840, port=443)).cflags()
    assert "-DCT_FILTER_NETNS=4026531840" in flags and "-DCT_FILTER_PORT=443" in flags and "-DCT_AGG=1" in flags
    p = Probe(plan)
    p.close()
    p.close()                      # idempotent without start
    assert p.lost_events() == 0 and p.read_aggregates() == []


# ---- other facts ----------------------------------------------------------------------------

def test_invalid_counter_sums_cpus(tmp_path):
    f = tmp_path / "nf_conntrack"
    f.write_text("entries  clashres found new invalid ignore\n"
                 "00000010 00000000 00000000 00000000 0000000a 00000001\n"
                 "00000010 00000000 00000000 00000000 00000005 00000000\n")
    assert kernel.conntrack_invalid_total(str(f)) == 15
    assert kernel.conntrack_invalid_total(str(tmp_path / "absent")) is None


def test_sysctls_reads_values_and_absent(tmp_path):
    (tmp_path / "nf_conntrack_tcp_be_liberal").write_text("1\n")
    k = kernel.sysctls(str(tmp_path))
    assert k["nf_conntrack_tcp_be_liberal"] == 1 and k["nf_conntrack_tcp_loose"] is None
