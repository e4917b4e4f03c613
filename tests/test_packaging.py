"""The four top-level folders install as sub-packages of dsv4_portable, from a wheel and from an editable install."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPORTS = ("import dsv4_portable, dsv4_portable.reference, dsv4_portable.backends.cuda, "
           "dsv4_portable.backends.ascend, dsv4_portable.conformance, dsv4_portable.model, dsv4_portable.ep, "
           "dsv4_portable.conformance.ascend_spec; "
           "print(dsv4_portable.__file__); print(dsv4_portable.reference.__file__)")


def test_wheel_maps_folders_into_the_namespace(tmp_path):
    # build from a copy: setuptools leaves build/ and *.egg-info in the source tree it is given
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", ".git",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("dsv4_portable-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("dsv4_portable/reference/quant.py", "dsv4_portable/backends/cuda/__init__.py",
                 "dsv4_portable/backends/ascend/__init__.py", "dsv4_portable/conformance/__init__.py",
                 "dsv4_portable/registry.py"):
        assert must in names, must
    # every package folder of the repo is in the wheel (a package missing from pyproject would vanish silently)
    folders = {"dsv4_portable": "dsv4_portable", "reference": "dsv4_portable/reference",
               "backends": "dsv4_portable/backends", "conformance": "dsv4_portable/conformance"}
    for top, installed_as in folders.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.relative_to(ROOT / top).as_posix()
            assert f"{installed_as}/{rel}" in names, f"{top}/{rel} is not packaged"
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"reference", "backends", "conformance"}, tops   # no generic top-level packages
    assert any(n.startswith("dsv4_portable/presets/") and n.endswith(".yaml") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [l for l in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    assert any(l.split()[1].startswith("tokenizers") and "extra" not in l for l in requires), requires
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(target)) for line in out.stdout.split()), out.stdout


def test_editable_install_resolves_to_the_repo(tmp_path):
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, ref = out.stdout.split()
    assert ref == str(ROOT / "reference" / "__init__.py") and first == str(ROOT / "dsv4_portable" / "__init__.py")
