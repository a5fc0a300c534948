"""Import bcc from the distro's python3-bpfcc, even from a venv or a pyenv Python.

bcc is not on PyPI in a usable form: it is the distro package python3-bpfcc, which
installs into /usr/lib/python3/dist-packages for the distro's python3.  From any
other interpreter we add only that package: the dist-packages directory goes on
sys.path just long enough to import ``bcc`` and is removed again, so the distro's
other modules never shadow the venv's.
"""
from __future__ import annotations

import glob
import importlib
import sys
from types import ModuleType

INSTALL_HINT = "bcc is not importable: apt install python3-bpfcc (Debian/Ubuntu) or dnf install python3-bcc"


class BccMissing(ImportError):
    """str() is a one-line message naming the package to install."""


def candidate_dirs() -> list[str]:
    """Where distros put python3-bpfcc: the generic dist-packages, then version-specific dirs."""
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    dirs = ["/usr/lib/python3/dist-packages", f"/usr/lib/python{v}/dist-packages",
            f"/usr/lib/python{v}/site-packages", f"/usr/lib64/python{v}/site-packages"]
    dirs += sorted(glob.glob("/usr/lib/python3.*/dist-packages"), reverse=True)
    dirs += sorted(glob.glob("/usr/lib/python3*/site-packages"), reverse=True)
    dirs += sorted(glob.glob("/usr/lib64/python3*/site-packages"), reverse=True)
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _has_bcc(d: str) -> bool:
    return bool(glob.glob(f"{d}/bcc/__init__.py"))


def import_bcc(dirs: list[str] | None = None) -> ModuleType:
    """Return the bcc module or raise BccMissing (one line, with the install command)."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    except Exception as e:  # bcc present but broken (e.g. libbcc missing)
        raise BccMissing(f"bcc failed to load ({e}); reinstall: apt install --reinstall python3-bpfcc") from None
    errors = []
    for d in (dirs if dirs is not None else candidate_dirs()):
        if not _has_bcc(d):
            continue
        sys.path.insert(0, d)
        before = set(sys.modules)
        try:
            mod = importlib.import_module("bcc")
            return mod
        except Exception as e:
            errors.append(f"{d}: {type(e).__name__}: {e}")
            for name in set(sys.modules) - before:
                if name == "bcc" or name.startswith("bcc."):
                    del sys.modules[name]
        finally:
            # bcc is imported (its submodules are loaded at import); keep the path clean
            try:
                sys.path.remove(d)
            except ValueError:
                pass
    if errors:
        raise BccMissing(f"bcc found but failed to import ({errors[0]}); "
                         f"python3-bpfcc may be built for another Python than "
                         f"{sys.version_info.major}.{sys.version_info.minor}: run conntrace with /usr/bin/python3")
    raise BccMissing(INSTALL_HINT)
