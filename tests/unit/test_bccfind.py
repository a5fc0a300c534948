"""bccfind: bcc from the distro's dist-packages, from any interpreter, without polluting sys.path."""
from __future__ import annotations

import sys

import pytest

from conntrace import bccfind


@pytest.fixture
def no_system_bcc(monkeypatch):
    """An interpreter that cannot import bcc by itself (a venv or pyenv Python)."""
    for name in list(sys.modules):
        if name == "bcc" or name.startswith("bcc."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "dist-packages" not in p
                                      and "site-packages/bcc" not in p])
    yield
    for name in list(sys.modules):     # drop the fakes; monkeypatch then restores the real bcc
        if name == "bcc" or name.startswith("bcc."):
            del sys.modules[name]


def fake_dist(tmp_path, body="VERSION = 'fake'\n", name="dist-packages"):
    d = tmp_path / name
    (d / "bcc").mkdir(parents=True)
    (d / "bcc" / "__init__.py").write_text(body)
    (d / "unrelated_module.py").write_text("X = 1\n")
    return str(d)


def test_imports_bcc_from_a_dist_packages_dir_and_cleans_sys_path(tmp_path, no_system_bcc):
    d = fake_dist(tmp_path)
    mod = bccfind.import_bcc([str(tmp_path / "empty"), d])
    assert mod.VERSION == "fake"
    assert d not in sys.path                     # only bcc came in, not the whole directory
    with pytest.raises(ImportError):
        __import__("unrelated_module")


def test_missing_bcc_says_how_to_install(tmp_path, no_system_bcc):
    with pytest.raises(bccfind.BccMissing) as exc:
        bccfind.import_bcc([str(tmp_path)])
    msg = str(exc.value)
    assert "apt install python3-bpfcc" in msg and "\n" not in msg


def test_broken_bcc_is_reported_in_one_line(tmp_path, no_system_bcc):
    d = fake_dist(tmp_path, body="raise OSError('libbcc.so.0: cannot open shared object file')\n")
    with pytest.raises(bccfind.BccMissing) as exc:
        bccfind.import_bcc([d])
    assert "libbcc.so.0" in str(exc.value) and "\n" not in str(exc.value)
    assert "bcc" not in sys.modules and d not in sys.path


def test_candidate_dirs_cover_debian_and_versioned_paths():
    dirs = bccfind.candidate_dirs()
    assert dirs[0] == "/usr/lib/python3/dist-packages"
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"/usr/lib/python{v}/dist-packages" in dirs
    assert len(dirs) == len(set(dirs))


def test_real_bcc_when_installed():
    try:
        mod = bccfind.import_bcc()
    except bccfind.BccMissing:
        pytest.skip("python3-bpfcc not installed here")
    assert hasattr(mod, "BPF")
