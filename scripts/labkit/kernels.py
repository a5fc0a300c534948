"""Resolve, download and unpack the Debian kernels the lab boots, by ABI class.

A class names a conntrack logging ABI, not a version: point releases come and go
from Debian's suites, so the newest package that falls in the class's version range
is chosen at run time, and after unpacking the module's BTF is checked so that a
class never silently boots a kernel of another ABI.

apt is pointed at a private state directory (sources, lists, archives) inside the
cache, so the machine's own apt configuration is neither needed nor changed.
"""
from __future__ import annotations

import fcntl
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, asdict
from pathlib import Path

from .paths import cache_dir

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = {
    "bullseye": MIRROR, "bullseye-security": SECURITY,
    "bookworm": MIRROR, "bookworm-security": SECURITY,
    "trixie": MIRROR, "trixie-security": SECURITY,
}
INDEX_MAX_AGE = 12 * 3600  # re-run `apt-get update` at most twice a day


@dataclass(frozen=True)
class KernelClass:
    name: str
    description: str
    suites: tuple            # where to look
    low: tuple               # lowest upstream version, inclusive
    high: tuple              # highest upstream version, exclusive
    abi: str                 # "pre-6.1" | "variadic" | "deferred": checked after unpacking
    userland: str            # "host" (this machine's /) or "trixie" (a debootstrapped root)


CLASSES = {
    c.name: c for c in [
        KernelClass("5.10", "bullseye 5.10.x: pre-6.1 reason strings, bool tcp_in_window",
                    ("bullseye", "bullseye-security"), (5, 10, 0), (5, 11, 0), "pre-6.1", "host"),
        KernelClass("6.1-variadic", "bookworm 6.1.x below 6.1.184: variadic nf_tcp_log_invalid",
                    ("bookworm", "bookworm-security"), (6, 1, 0), (6, 1, 184), "variadic", "host"),
        KernelClass("6.1", "bookworm-security 6.1.x >= 6.1.184: deferred struct nf_tcp_invalid_log",
                    ("bookworm-security", "bookworm"), (6, 1, 184), (6, 2, 0), "deferred", "host"),
        KernelClass("6.12", "trixie 6.12.x: deferred struct nf_tcp_invalid_log, trixie userland",
                    ("trixie", "trixie-security"), (6, 12, 104), (6, 13, 0), "deferred", "trixie"),
    ]
}
DEFAULT_CLASS = "6.1"


class LabError(Exception):
    """A one-line, user-facing lab failure."""


@dataclass
class Candidate:
    image: str          # binary package name, e.g. linux-image-6.1.0-56-amd64-unsigned
    kver: str           # uname -r of that kernel, e.g. 6.1.0-56-amd64
    version: str        # Debian version, e.g. 6.1.192-2
    upstream: tuple     # (6, 1, 192)
    suite: str
    has_headers: bool = True   # BCC needs them; security suites sometimes drop them first

    @property
    def upstream_str(self) -> str:
        return ".".join(map(str, self.upstream))


@dataclass
class Kernel:
    """An unpacked kernel, ready to boot."""
    klass: str
    kver: str
    version: str
    upstream: str
    tree: str           # extracted image + modules + headers, merged /usr layout
    vmlinux: str        # uncompressed ELF (PVH boot) or "" if extraction failed
    bzimage: str
    abi: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


# ---------------------------------------------------------------------------
# private apt

def apt_dir() -> Path:
    d = cache_dir() / "apt"
    for sub in ("lists/partial", "archives/partial", "etc"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def apt_options() -> list[str]:
    d = apt_dir()
    return [
        "-o", f"Dir::Etc::SourceList={d / 'etc/sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", f"Dir::Cache={d}",
        "-o", f"Dir::Cache::archives={d / 'archives'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
        "-o", "Acquire::Retries=3",
    ]


@contextmanager
def cache_lock(name: str):
    """Serialise downloads and builds between concurrent lab runs."""
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, **kw) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]} is not installed (apt-get install {cmd[0]})")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LabError(f"{what} failed: {' | '.join(tail)}")
    return proc.stdout


def update_index(force: bool = False) -> None:
    d = apt_dir()
    sources = "".join(f"deb [signed-by={KEYRING}] {url} {suite} main\n" for suite, url in SUITES.items())
    src = d / "etc/sources.list"
    stamp = d / "updated"
    fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < INDEX_MAX_AGE
    if not force and fresh and src.exists() and src.read_text() == sources:
        return
    src.write_text(sources)
    with cache_lock("apt"):
        # An unreachable optional suite (trixie-security may not answer) is tolerated by apt
        # as a warning; only a total failure stops us.
        _run(["apt-get", *apt_options(), "-q", "update"], "apt-get update (Debian package index)")
    stamp.touch()


def _parse_upstream(version: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def candidates(klass: KernelClass) -> list[Candidate]:
    """Every generic amd64 kernel image in the class's suites, newest first."""
    opts = apt_options()
    out = _run(["apt-cache", *opts, "search", "--names-only", r"^linux-image-[0-9][0-9.+a-z-]*-amd64(-unsigned)?$"],
               "apt-cache search")
    names = sorted({line.split()[0] for line in out.splitlines() if line.strip()})
    hdr_out = _run(["apt-cache", *opts, "search", "--names-only", r"^linux-headers-[0-9][0-9.+a-z-]*-amd64$"],
                   "apt-cache search")
    headers = {line.split()[0] for line in hdr_out.splitlines() if line.strip()}
    found: dict[str, Candidate] = {}
    if not names:
        return []
    madison = _run(["apt-cache", *opts, "madison", *names], "apt-cache madison")
    for line in madison.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3:
            continue
        name, version, origin = parts[0], parts[1], parts[2]
        suite = origin.split()[1].split("/")[0] if len(origin.split()) > 1 else ""
        if suite not in klass.suites:
            continue
        if any(flavour in name for flavour in ("-cloud-", "-rt-", "-dbg")):
            continue  # the cloud flavour has no 9p; rt changes scheduling
        up = _parse_upstream(version)
        if not (klass.low <= up < klass.high):
            continue
        kver = re.sub(r"-unsigned$", "", name)[len("linux-image-"):]
        cand = Candidate(name, kver, version, up, suite, has_headers=f"linux-headers-{kver}" in headers)
        # Prefer the unsigned package (no signature wrapper); either has the same kernel.
        prev = found.get(kver)
        if prev is None or (name.endswith("-unsigned") and not prev.image.endswith("-unsigned")):
            found[kver] = cand
    return sorted(found.values(), key=lambda c: (c.has_headers, c.upstream, c.version), reverse=True)


def cached_candidates(klass: KernelClass) -> list[Candidate]:
    """candidates(), remembered until the package index is next refreshed (saves ~3 s a run)."""
    stamp = apt_dir() / "updated"
    memo = apt_dir() / f"candidates-v2-{klass.name}.json"
    if memo.exists() and stamp.exists() and memo.stat().st_mtime >= stamp.stat().st_mtime:
        return [Candidate(**{**c, "upstream": tuple(c["upstream"])}) for c in json.loads(memo.read_text())]
    cands = candidates(klass)
    memo.write_text(json.dumps([asdict(c) for c in cands]))
    return cands


def header_packages(kver: str, version: str) -> list[str]:
    """linux-headers-KVER plus the common and kbuild packages it depends on."""
    headers = f"linux-headers-{kver}"
    show = _run(["apt-cache", *apt_options(), "show", f"{headers}={version}"], f"apt-cache show {headers}")
    deps = ""
    for line in show.splitlines():
        if line.startswith("Depends:"):
            deps = line[len("Depends:"):]
            break
    pkgs = [f"{headers}={version}"]
    for dep in deps.split(","):
        dep = dep.strip().split("|")[0].strip()
        m = re.match(r"([a-z0-9.+-]+)\s*(\(([^)]*)\))?", dep)
        if not m:
            continue
        name = m.group(1)
        if name.startswith("linux-headers-") or name.startswith("linux-kbuild-"):
            constraint = m.group(3) or ""
            pin = constraint.split()[-1] if constraint.startswith("=") else ""
            pkgs.append(f"{name}={pin}" if pin else name)
    return pkgs


# ---------------------------------------------------------------------------
# unpacking

def kernel_dir(kver: str) -> Path:
    return cache_dir() / "kernels" / kver


def download(pkgs: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *apt_options(), "-q", "download", *pkgs], f"apt-get download {' '.join(pkgs)}", cwd=dest)
    return sorted(dest.glob("*.deb"))


def _merge_usr(tree: Path) -> None:
    """Debian's / is merged-/usr: /lib is a symlink to usr/lib.  Older kernel packages
    ship /lib/modules; move them under usr/ and leave the same symlink, so that laying
    this tree over the root filesystem never hides the real /lib."""
    for top in ("lib", "bin", "sbin"):
        p = tree / top
        if p.is_dir() and not p.is_symlink():
            target = tree / "usr" / top
            target.mkdir(parents=True, exist_ok=True)
            for child in p.iterdir():
                dest = target / child.name
                if dest.exists():
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                shutil.move(str(child), str(dest))
            p.rmdir()
        if not p.exists() and (tree / "usr" / top).exists():
            p.symlink_to(f"usr/{top}")


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Pull the XZ-compressed ELF out of a bzImage so QEMU can boot it via PVH,
    skipping the slow in-guest decompression (about 3.5 s under TCG)."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    while start != -1:
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            elf = dec.decompress(data[start:])
            if elf[:4] == b"\x7fELF":
                out.write_bytes(elf)
                return True
        except lzma.LZMAError:
            pass
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    return False


def _module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return raw


def detect_abi(tree: Path, kver: str) -> str:
    """The conntrack logging ABI, read from the module's BTF strings and symbols:
    deferred kernels have `struct nf_tcp_invalid_log`; variadic 6.1-style kernels have
    `nf_tcp_log_invalid` without it; older kernels have neither."""
    mods = list((tree / "usr/lib/modules" / kver).rglob("nf_conntrack.ko*"))
    if not mods:
        raise LabError(f"{kver}: nf_conntrack module not found in the package")
    blob = _module_bytes(mods[0])
    if b"nf_tcp_invalid_log" in blob:
        return "deferred"
    if b"nf_tcp_log_invalid" in blob:
        return "variadic"
    return "pre-6.1"


def prepare(class_name: str, refresh: bool = False) -> Kernel:
    """Resolve the class to a package, download and unpack it once, verify its ABI."""
    if class_name not in CLASSES:
        raise LabError(f"unknown kernel class {class_name!r}; known: {', '.join(CLASSES)}")
    klass = CLASSES[class_name]
    update_index(force=refresh)
    cands = cached_candidates(klass)
    if not cands:
        raise LabError(f"class {class_name}: no kernel in {'/'.join(klass.suites)} between "
                       f"{'.'.join(map(str, klass.low))} and {'.'.join(map(str, klass.high))}; "
                       f"the suites no longer carry this ABI")
    problems = []
    skipped = [c for c in cands if not c.has_headers]
    if skipped and cands[0].has_headers and skipped[0].upstream > cands[0].upstream:
        print(f"lab: class {class_name}: newer {', '.join(c.upstream_str for c in skipped[:3])} "
              f"ha{'ve' if len(skipped) > 1 else 's'} no headers package (BCC needs one); "
              f"using {cands[0].upstream_str}", file=sys.stderr)
    for cand in cands:
        kdir = kernel_dir(cand.kver)
        meta = kdir / "kernel.json"
        if meta.exists():
            k = Kernel(**json.loads(meta.read_text()))
            if k.version == cand.version:
                return _check_abi(klass, k)
        try:
            with cache_lock(f"kernel-{cand.kver}"):
                if meta.exists() and Kernel(**json.loads(meta.read_text())).version == cand.version:
                    return _check_abi(klass, Kernel(**json.loads(meta.read_text())))
                k = _unpack(klass, cand)
            return _check_abi(klass, k)
        except LabError as exc:
            problems.append(f"{cand.upstream_str}: {exc}")
            # A vanished pool file (404) or a wrong ABI: try the next older one, and say so.
            print(f"lab: class {class_name}: {cand.upstream_str} ({cand.kver}) is unusable ({exc}); "
                  f"trying the next older one", file=sys.stderr)
            continue
    raise LabError(f"class {class_name}: no usable kernel; tried " + "; ".join(problems[:4]))


def _check_abi(klass: KernelClass, k: Kernel) -> Kernel:
    if k.abi != klass.abi:
        raise LabError(f"class {klass.name} wants the {klass.abi} ABI but {k.upstream} ({k.kver}) "
                       f"has the {k.abi} ABI; refusing to test a different ABI")
    return k


def _unpack(klass: KernelClass, cand: Candidate) -> Kernel:
    kdir = kernel_dir(cand.kver)
    if kdir.exists():
        shutil.rmtree(kdir)
    debs = kdir / "debs"
    pkgs = [f"{cand.image}={cand.version}", *header_packages(cand.kver, cand.version)]
    files = download(pkgs, debs)
    tree = kdir / "tree"
    tree.mkdir(parents=True)
    for deb in files:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"dpkg-deb -x {deb.name}")
    _merge_usr(tree)
    # Packages are extracted, not installed, so run the part of postinst we need.
    _run(["depmod", "-b", str(tree), cand.kver], f"depmod {cand.kver}")
    bz = tree / "boot" / f"vmlinuz-{cand.kver}"
    if not bz.exists():
        raise LabError(f"{cand.image}: no /boot/vmlinuz-{cand.kver} inside")
    vmlinux = kdir / "vmlinux"
    has_elf = extract_vmlinux(bz, vmlinux)
    k = Kernel(klass=klass.name, kver=cand.kver, version=cand.version, upstream=cand.upstream_str,
               tree=str(tree), vmlinux=str(vmlinux) if has_elf else "", bzimage=str(bz),
               abi=detect_abi(tree, cand.kver))
    shutil.rmtree(debs)  # the unpacked tree is all we use
    k.save(kdir / "kernel.json")
    return k


def resolve_all(refresh: bool = False) -> list[tuple[str, object, list]]:
    """(class, Candidate or LabError, newer candidates skipped for lack of headers)."""
    update_index(force=refresh)
    rows = []
    for name, klass in CLASSES.items():
        cands = cached_candidates(klass)
        usable = [c for c in cands if c.has_headers]
        skipped = [c for c in cands if not c.has_headers and usable and c.upstream > usable[0].upstream]
        rows.append((name, usable[0] if usable else LabError("none found"), skipped))
    return rows
