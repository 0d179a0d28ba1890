"""Installing the project adds one importable name, `guided_concepts`, and a user's own modules
called like ours (`metrics.py`, a `configs/` package, `train.py`) neither shadow it nor are shadowed."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every module and package at the repository root: installed, they live only under guided_concepts.
OUR_NAMES = sorted({p.stem for p in REPO.glob("*.py") if p.stem != "__init__"} |
                   {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"})


def test_one_top_level_name():
    assert len(OUR_NAMES) > 15                         # the scan found the project's modules
    top_level = importlib.metadata.distribution("guided-concepts").read_text("top_level.txt")
    assert top_level.split() == ["guided_concepts"]


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
