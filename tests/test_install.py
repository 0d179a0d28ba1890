"""Installing the project adds one importable name, `guided_concepts`, and a user's own modules
called like ours (`metrics.py`, a `configs/` package, `train.py`) neither shadow it nor are shadowed."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every module and package at the repository root: installed, they live only under guided_concepts.
OUR_NAMES = sorted({p.stem for p in REPO.glob("*.py") if p.stem != "__init__"} |
                   {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"})


def test_one_top_level_name():
    assert len(OUR_NAMES) > 15                         # the scan found the project's modules
    top_level = importlib.metadata.distribution("guided-concepts").read_text("top_level.txt")
    assert top_level.split() == ["guided_concepts"]
    # The scripts' folders and a user's own folders at the root are not part of the package.
    (REPO / "runs").mkdir(exist_ok=True)
    for name in ("experiments", "bench", "tests", "runs", "docs"):
        assert (REPO / name).is_dir() and importlib.util.find_spec(f"guided_concepts.{name}") is None, name


USER_SCRIPT = """
import importlib.util, sys
import guided_concepts.train                       # the project, with everything it imports
from guided_concepts.configs.schema import load_config
from guided_concepts.metrics import variance_ratio
config = load_config(None, tokens="shape,pose")
assert config.tokens == ["shape", "pose"], config.tokens

import metrics, configs.schema, train              # the user's own modules, next to the script
assert metrics.MINE and configs.schema.MINE and train.MINE
assert not hasattr(metrics, "variance_ratio")
# None of our other names is importable from outside the repository.
leaked = [n for n in {names!r} if n not in ("metrics", "configs", "train") and importlib.util.find_spec(n)]
assert not leaked, leaked
print("no collision")
"""


@pytest.mark.slow
def test_user_modules_do_not_collide(tmp_path):
    (tmp_path / "metrics.py").write_text("MINE = True\n")
    (tmp_path / "train.py").write_text("MINE = True\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    (tmp_path / "configs" / "schema.py").write_text("MINE = True\n")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT.format(names=OUR_NAMES)))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "no collision"


# ----------------------------------------------------------------------------------------------
# Standard tools from a clean checkout: pyright resolves our imports, plain pytest collects
# ----------------------------------------------------------------------------------------------
OWN = ("guided_concepts", "experiments", "bench", "tests")


def unresolved_own_imports(args: list[str], project: Path) -> tuple[int, list[str]]:
    """pyright's unresolved imports of our own names: (files analysed, messages). `project` is
    named, so a pyrightconfig.json in a folder above it cannot take over."""
    run = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
                          "--project", str(project), *args], cwd=project, capture_output=True, text=True, timeout=1800)
    report = json.loads(run.stdout)
    return report["summary"]["filesAnalyzed"], [
        f"{d['file']}: {d['message']}" for d in report["generalDiagnostics"]
        if d.get("rule") == "reportMissingImports" and any(f'"{name}' in d["message"] for name in OWN)]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyright") is None, reason="pyright: pip install -e '.[dev]'")
@pytest.mark.slow
def test_pyright_resolves_every_import_in_the_repository_and_in_a_user_script(tmp_path):
    analysed, missing = unresolved_own_imports([], REPO)          # [tool.pyright] in pyproject.toml
    assert analysed > 100 and not missing, missing[:10]
    (tmp_path / "pyrightconfig.json").write_text("{}")                # the user's project, pyright's defaults
    script = tmp_path / "my_script.py"
    script.write_text("from guided_concepts.system import GuidedConcepts\nfrom guided_concepts.concepts import CONCEPTS\n"
                      "from guided_concepts.toyworld.probes import encode_word\nimport guided_concepts.train\n")
    analysed, missing = unresolved_own_imports([str(script)], tmp_path)
    assert analysed == 1 and not missing, missing
    (tmp_path / "other.py").write_text("import guided_concepts.no_such_module\n")   # the check can fail
    assert unresolved_own_imports([str(tmp_path / "other.py")], tmp_path)[1]


def collected(command: list[str]) -> list[str]:
    run = subprocess.run([*command, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:]
    return [line for line in run.stdout.splitlines() if "::" in line]


@pytest.mark.slow
@pytest.mark.slow
def test_plain_pytest_collects_what_python_m_pytest_collects():
    plain = shutil.which("pytest", path=str(Path(sys.executable).parent)) or shutil.which("pytest")
    assert plain, "no pytest script next to the interpreter"
    with_module = collected([sys.executable, "-m", "pytest"])
    assert len(with_module) > 500
    assert collected([plain]) == with_module
