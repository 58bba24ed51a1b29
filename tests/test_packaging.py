"""What pip installs: the project's metadata, and a wheel built, installed and imported."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
MODULES = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for path in (ROOT / "localchat").rglob("*.py"))


def distribution_name(requirement: str) -> str:
    """`huggingface-hub>=2.4,<3` -> `huggingface-hub`, normalized as PEP 503 says."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level_names(source: Path) -> set[str]:
    """Every absolute import in a file, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_package_the_code_imports_is_a_declared_dependency():
    imported = set().union(*(imported_top_level_names(path)
                             for path in (ROOT / "localchat").rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"localchat", "__future__"}
    providers = importlib.metadata.packages_distributions()
    needed = {distribution_name(dist) for name in third_party for dist in providers[name]}
    declared = {distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert needed - declared == set(), f"imported but not declared: {sorted(needed - declared)}"
    assert {"llama-cpp-python", "numpy", "filelock"} <= needed  # the check sees lazy imports


def test_the_license_is_declared_shipped_and_buildable():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)...
    build_requires = PYPROJECT["build-system"]["requires"]
    setuptools = next(r for r in build_requires if distribution_name(r) == "setuptools")
    assert int(re.search(r">=\s*(\d+)", setuptools).group(1)) >= 77  # ...which setuptools 77 reads
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text  # the full text


def test_no_marker_is_declared_that_no_test_uses():
    markers = PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]
    declared = {line.split(":")[0] for line in markers}
    used = {match for path in (ROOT / "tests").glob("*.py")
            for match in re.findall(r"pytest\.mark\.(\w+)", path.read_text(encoding="utf-8"))}
    assert declared <= used


# ---- the wheel ----------------------------------------------------------------------------------

# Runs inside the fresh virtual environment: every module imports from the installed wheel (with
# llama_cpp made unimportable: nothing may need it at import time), and the catalog loads from it.
PROBE = r"""
import importlib, importlib.abc, json, sys
from importlib import resources

class NoLlamaCpp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llama_cpp":
            raise ImportError("llama_cpp is blocked in this probe")

sys.meta_path.insert(0, NoLlamaCpp())
files = {}
for name in json.loads(sys.argv[1]):
    files[name] = importlib.import_module(name).__file__
from localchat.models import catalog
packaged = resources.files("localchat.models").joinpath("models.toml")
print(json.dumps({"files": files, "catalog": catalog.shipped_catalog_text(),
                  "names": catalog.load_catalog().names(), "packaged": str(packaged)}))
"""


@pytest.mark.slow
def test_a_built_wheel_installs_in_a_fresh_venv_and_every_module_imports_from_it(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info here
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "models.toml"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "localchat", source / "localchat", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert (source / "localchat" / "models" / "models.toml").is_symlink()  # as committed
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--no-index", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("localchat-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "localchat").rglob("*.py")}
        assert sources - names == set()
        catalog = archive.read("localchat/models/models.toml")  # the file, not a link
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        licenses = [n for n in names if re.search(r"\.dist-info/licenses/LICENSE$", n)]
    assert catalog == (ROOT / "models.toml").read_bytes()
    assert b"License-Expression: Apache-2.0" in metadata and len(licenses) == 1
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "--no-index", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    site_packages = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this interpreter's environment, after the venv's own packages;
    # a plain path in a .pth file runs none of that environment's hooks (its editable install).
    outer = [path for path in sys.path if path.endswith("site-packages")]
    (site_packages / "zz_dependencies.pth").write_text("\n".join(outer) + "\n")

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    probe = subprocess.run([python, "-c", PROBE, json.dumps(MODULES)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert sorted(found["files"]) == MODULES
    outside = {name: file for name, file in found["files"].items()
               if not Path(file).is_relative_to(site_packages)}
    assert outside == {}, "imported from somewhere other than the installed wheel"
    assert not Path(found["packaged"]).is_symlink()
    assert found["catalog"] == (ROOT / "models.toml").read_text(encoding="utf-8")
    assert "smollm2" in found["names"]

    script = subprocess.run([venv / "bin" / "localchat", "--version"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("localchat 0.1.0\n")
