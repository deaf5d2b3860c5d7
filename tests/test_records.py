"""The version records: lock files parsed as pip reads them, differences named both ways."""

from __future__ import annotations

from finextract.records import canonical_name, installed_versions, locked_versions, version_differences


def test_locked_versions_read_pins_and_skip_the_rest(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# comment\n"
        "torch==2.13.0+cpu \\\n    --hash=sha256:00\n    # via finextract\n"
        "Open_Clip.Torch==3.3.0\n"
        "uvicorn[standard]==0.30.1 ; python_version >= '3.10'\n"
        "-e .\nnumpy>=1.24\n"
    )
    assert locked_versions(lock) == {"torch": "2.13.0+cpu", "open-clip-torch": "3.3.0", "uvicorn": "0.30.1"}


def test_version_differences_name_changed_missing_and_unlocked_distributions():
    locked = {"torch": "2.13.0+cpu", "numpy": "2.1.0", "kernels": "0.19.1"}
    installed = {"torch": "2.13.0+cpu", "numpy": "2.2.0", "extra": "1.0"}
    assert version_differences(locked, installed) == {
        "extra": {"locked": None, "installed": "1.0"},
        "kernels": {"locked": "0.19.1", "installed": None},
        "numpy": {"locked": "2.1.0", "installed": "2.2.0"},
    }


def test_installed_versions_are_importlib_metadata_versions():
    import importlib.metadata

    versions = installed_versions()
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert versions[canonical_name("PyYAML")] == importlib.metadata.version("PyYAML")
    assert list(versions) == sorted(versions)


def test_installed_versions_ignore_distributions_outside_site_packages(tmp_path, monkeypatch):
    # a Ray worker's sys.path holds Ray's vendored packages, a checkout its *.egg-info: not installed
    (tmp_path / "vendored_only-1.0.dist-info").mkdir()
    (tmp_path / "vendored_only-1.0.dist-info" / "METADATA").write_text("Name: vendored_only\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "vendored-only" not in installed_versions()
