"""`conntrace doctor`: can `conntrace trace` run here, and if not, what fixes it.

One line per check: ``ok``/``FAIL``/``warn``, what was found, and for every problem
the command that fixes it.  ``run_doctor()`` returns 0 only when trace can run.
"""
from __future__ import annotations

import os
from typing import Callable

from . import kernel

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _caps() -> tuple[bool, str]:
    if os.geteuid() == 0:
        return True, "running as root"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    have = {name: bool(caps >> bit & 1) for name, bit in
                            (("CAP_SYS_ADMIN", 21), ("CAP_PERFMON", 38), ("CAP_BPF", 39))}
                    if have["CAP_SYS_ADMIN"] or (have["CAP_PERFMON"] and have["CAP_BPF"]):
                        return True, "capabilities: " + ", ".join(k for k, v in have.items() if v)
                    return False, "not root and no CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"
    except OSError:
        pass
    return False, "not root"


def run_doctor(out: Callable[[str], None] = print) -> int:
    """Print one line per check; return 0 only when `conntrace trace` can run."""
    fatal: list[str] = []
    release = os.uname().release

    def line(status: str, what: str, detail: str, fix: str = "") -> None:
        if status == FAIL:
            fatal.append(f"{what} {detail}" if what == "kprobes" else f"{what}: {detail}")
        out(f"{status:4}  {what:18} {detail}" + (f"\n      {'':18} fix: {fix}" if fix else ""))

    ok, why = _caps()
    line(OK if ok else FAIL, "privileges", why, "" if ok else "run as root: sudo conntrace trace")

    from .bccfind import import_bcc, BccMissing
    try:
        bcc = import_bcc()
        ver = getattr(bcc, "__version__", "") or ""
        line(OK, "bcc", f"importable from {os.path.dirname(bcc.__file__)} {ver}".rstrip())
    except BccMissing as e:
        line(FAIL, "bcc", str(e), "apt install python3-bpfcc")

    hdr = kernel.headers_dir(release)
    if hdr:
        line(OK, "kernel headers", hdr)
    else:
        line(FAIL, "kernel headers", f"/lib/modules/{release}/build is missing (BCC compiles against it)",
             f"apt install linux-headers-{release}")

    kp, why = kernel.kprobes_available()
    if kp:
        line(OK, "kprobes", why)
    else:
        line(FAIL, "kprobes", f"unavailable: {why}",
             "boot a kernel built with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y "
             "(every distro kernel is); `scripts/lab demo` shows conntrace in a VM")

    lock = kernel.lockdown()
    if lock is None:
        line(OK, "lockdown", "no lockdown LSM (/sys/kernel/security/lockdown absent)")
    elif lock == "confidentiality":
        line(FAIL, "lockdown", "confidentiality: kprobes and BPF kernel reads are refused",
             "boot with lockdown=integrity (or disable Secure Boot lockdown)")
    else:
        line(OK, "lockdown", lock)

    try:
        syms = kernel.kallsyms(names={"nf_conntrack_in", "nf_tcp_log_invalid",
                                      "nf_ct_l4proto_log_invalid", "nf_l4proto_log_invalid"})
    except OSError as e:
        syms = {}
        line(FAIL, "kallsyms", f"cannot read /proc/kallsyms: {e.strerror}", "run as root")
    loaded = kernel.conntrack_loaded(syms)
    if loaded and "nf_conntrack_in" in syms:
        mod = syms["nf_conntrack_in"] or "built in"
        line(OK, "nf_conntrack", f"loaded ({mod})")
    elif loaded:
        line(OK, "nf_conntrack", "loaded")
    else:
        line(FAIL, "nf_conntrack", "not loaded: nothing to trace yet",
             "modprobe nf_conntrack (or add a firewall rule that uses conntrack)")

    btf_path = "/sys/kernel/btf/vmlinux"
    if os.path.exists(btf_path):
        mod_btf = os.path.exists("/sys/kernel/btf/nf_conntrack")
        line(OK, "BTF", btf_path + (" + /sys/kernel/btf/nf_conntrack" if mod_btf else ""))
    else:
        line(WARN, "BTF", "no /sys/kernel/btf/vmlinux: the ABI is inferred from kallsyms and headers",
             "use a kernel with CONFIG_DEBUG_INFO_BTF=y for exact detection")

    if loaded:
        from .probe import plan_attach, ProbeError
        try:
            plan = plan_attach(check_kprobes=False)
            line(OK, "attach rung", f"{plan.rung}: {plan.abi.get('why', '')}")
            line(OK, "probes", ", ".join(plan.probes))
            for m in plan.missing:
                line(WARN, "will miss", m)
        except ProbeError as e:
            line(FAIL, "attach rung", str(e))

    k = kernel.sysctls()
    if k.get("nf_conntrack_tcp_be_liberal") is None:
        line(WARN, "sysctls", "net.netfilter.nf_conntrack_* absent (module not loaded in this netns?)")
    else:
        shown = ", ".join(f"{name.replace('nf_conntrack_', '')}={v}" for name, v in k.items() if v is not None)
        line(OK, "sysctls", f"this netns: {shown}")
        if k.get("nf_conntrack_tcp_be_liberal"):
            line(WARN, "be_liberal", "be_liberal=1 here: window reasons are accepted; only 6.1 "
                 "variadic kernels still report them (as accepted-liberal)")

    if fatal:
        fatal.sort(key=lambda f: not f.startswith("kprobes"))   # the root cause first
        out("conntrace trace cannot run here: " + "; ".join(fatal))
        return 1
    out("conntrace trace can run here")
    return 0
