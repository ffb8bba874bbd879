"""README.md is generated from nbs/index.ipynb and must not drift from it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_rendered_from_index():
    res = subprocess.run([sys.executable, str(ROOT/"scripts"/"render_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_readme_quick_start_has_the_two_commands():
    text = (ROOT/"README.md").read_text()
    assert 'pip install -e ".[dev]" && ptm-course tour' in text and "\npytest\n" in text
