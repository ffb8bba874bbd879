"""Render nbs/index.ipynb to README.md (what nbdev-readme does, without Quarto, which can't be
installed offline). `--check` writes nothing and exits 1 if README.md is out of date."""
import argparse
import sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by scripts/render_readme.py: edit the notebook, not this file. -->\n\n"


def render(index: Path = ROOT/"nbs"/"index.ipynb") -> str:
    nb = nbformat.read(index, as_version=4)
    for cell in nb.cells:  # a directive cell such as `#| hide` stays out of the README
        if cell.cell_type == "code" and "#| hide" in cell.source: cell.source, cell.outputs = "", []
    nb.cells = [c for c in nb.cells if c.source.strip()]
    nb.metadata["language_info"] = {"name": "python"}  # so code blocks are fenced as python
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    return HEADER + body.strip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendered notebook")
    args = p.parse_args(argv)
    text, readme = render(), ROOT/"README.md"
    if args.check:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `python scripts/render_readme.py`.")
            return 1
        return 0
    readme.write_text(text)
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
