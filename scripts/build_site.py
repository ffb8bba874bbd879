"""Build the course website from the notebooks' saved outputs, offline: `python scripts/build_site.py --output _site`.

Pages: the README as home, every notebook of `nbs/` (chapters first, then the course's tooling), the student
exercises (each linked from the end of its chapter), and an API reference generated from the library with Sphinx
autodoc. Nothing is executed: a page shows the outputs its notebook was saved with. Nothing is fetched either:
MathJax comes from the npm package `mathjax@3` (`npm ci` in the repository, once) and is copied into the site, the
theme's fonts and scripts are its own, and the stale progress-bar widgets of the saved outputs are dropped.
Open `_site/index.html` in a browser, or serve the folder with any static host (`python -m http.server -d _site`).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^\s*#\|.*$\n?", re.M)                  # nbdev's `#| export`, `#| hide`, `#| default_exp ...`
WIDGET = "application/vnd.jupyter.widget-view+json"

MATHJAX_PARTS = ["tex-svg.js", "input", "output/svg", "output/svg.js", "ui", "a11y", "sre", "adaptors"]


def find_mathjax(explicit: str | None = None) -> Path:
    "The `es5` folder of MathJax 3: `--mathjax`, else `node_modules/mathjax/es5` of the repository."
    candidates = [Path(explicit)] if explicit else [ROOT/"node_modules"/"mathjax"/"es5"]
    for c in candidates:
        if (c/"tex-svg.js").exists(): return c
    raise SystemExit(f"MathJax 3 not found (looked for tex-svg.js in {', '.join(map(str, candidates))}). Install it once "
                     "with `npm ci` in the repository (package.json pins mathjax@3), or pass --mathjax PATH/TO/mathjax/es5.")


def is_tooling(name: str) -> bool:
    "Notebooks 90-99 (and 97a, 97b, ...) build the course's tooling (grader, checkers, benchmarks, command)."
    return chapter_key(name).startswith("9")


def chapter_key(name: str) -> str:
    "'05_bert_pretraining' -> '05': chapters and their exercises share the number before the first underscore."
    return name.split("_")[0]


def clean_cell(cell: dict) -> dict | None:
    "The cell as a reader sees it on the web: nbdev directives gone, `#| hide` cells and progress widgets dropped."
    src = "".join(cell.get("source", ""))
    if cell["cell_type"] != "code": return cell
    if re.search(r"^\s*#\|\s*hide\b", src, re.M): return None
    src = DIRECTIVE.sub("", src).strip("\n")
    if not src.strip() and not cell.get("outputs"): return None
    outputs = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if WIDGET in data: continue                     # a tqdm bar saved at 0 %: needs a CDN and says nothing true
        if "text/markdown" in data:                     # `show_doc` opens with a rule, which is no place for one here
            data["text/markdown"] = re.sub(r"^\s*---\s*\n", "", "".join(data["text/markdown"]))
        outputs.append(out)
    return {**cell, "source": src, "outputs": outputs}


def clean_notebook(path: Path, footer: str | None = None) -> dict:
    "A notebook ready for myst-nb: cleaned cells, no widget state, and an optional closing markdown cell."
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb["cells"] = [c for c in map(clean_cell, nb["cells"]) if c is not None]
    if footer: nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": footer})
    for i, c in enumerate(nb["cells"]): c.setdefault("id", f"cell-{i}")  # nbdev-clean strips ids; nbformat 4.5 wants them
    nb["metadata"].pop("widgets", None)
    return nb


def exercise_footer(chapter: Path, exercises: dict[str, Path]) -> str | None:
    "A closing 'Exercises' cell for a chapter that has exercises and does not link them already."
    ex = exercises.get(chapter_key(chapter.stem))
    if ex is None or is_tooling(chapter.stem) or f"exercises/{ex.name}" in chapter.read_text(encoding="utf-8"): return None
    return (f"## Exercises\n\nPractise what this chapter taught with [its exercises](../exercises/{ex.name}): "
            "each one checks itself and gives a hint when something is off. In JupyterLab, open "
            f"`exercises/{ex.name}` from the repository.")


def home_page(readme: str, chapters: list[str], tooling: list[str], exercises: list[str]) -> str:
    "The README with its folder links pointed at pages, and the site's navigation."
    text = re.sub(r"^<!--.*?-->\s*", "", readme, flags=re.S)
    text = text.replace("](exercises/)", "](exercises/index.md)").replace("](results/)", "](nbs/98_bench.ipynb)")
    def toc(caption, entries): return "\n```{toctree}\n:hidden:\n:caption: " + caption + "\n\n" + "\n".join(entries) + "\n```\n"
    return (text + toc("Chapters", chapters) + toc("Exercises", ["exercises/index"] + exercises)
            + toc("Course tooling", tooling) + toc("Reference", ["api/index"]))


def api_pages(stage: Path) -> list[str]:
    "One page per library module, documented from its docstrings by autodoc."
    sys.path.insert(0, str(ROOT))
    modules = sorted(p.stem for p in (ROOT/"ptm_course").glob("*.py") if not p.stem.startswith("_"))
    modules += sorted(f"checks.{p.stem}" for p in (ROOT/"ptm_course"/"checks").glob("*.py") if not p.stem.startswith("_"))
    (stage/"api").mkdir()
    for m in modules:
        (stage/"api"/f"{m}.md").write_text(f"# `ptm_course.{m}`\n\n```{{eval-rst}}\n.. automodule:: ptm_course.{m}\n```\n")
    (stage/"api"/"index.md").write_text(
        "# API reference\n\nEvery module of the `ptm_course` library, generated from its docstrings. Each module is "
        "exported from the notebook named at the top of its source file.\n\n```{toctree}\n:maxdepth: 1\n\n"
        + "\n".join(modules) + "\n```\n")
    return modules


def stage_sources(stage: Path, mathjax: Path) -> int:
    "Copy everything the site shows into `stage`, cleaned; returns the number of pages."
    exercises = {chapter_key(p.stem): p for p in sorted((ROOT/"exercises").glob("*.ipynb"))}
    notebooks = sorted(p for p in (ROOT/"nbs").glob("*.ipynb") if p.stem != "index")
    chapters = [p for p in notebooks if not is_tooling(p.stem)]
    tooling = [p for p in notebooks if is_tooling(p.stem)]
    (stage/"nbs").mkdir(parents=True); (stage/"exercises").mkdir()
    for p in notebooks:
        (stage/"nbs"/p.name).write_text(json.dumps(clean_notebook(p, exercise_footer(p, exercises))), encoding="utf-8")
    by_key = {chapter_key(p.stem): p for p in chapters}
    lines = ["# Exercises\n", "Each chapter's exercises as a learner gets them: fill in the functions, run the check "
             "cells, read the hints. The solutions stay with the instructors (`exercises/solutions/` in the "
             "repository; see *For instructors* on the home page).\n"]
    for key, p in exercises.items():
        back = by_key.get(key)
        footer = f"---\n\nBack to [the chapter](../nbs/{back.name})." if back else None
        (stage/"exercises"/p.name).write_text(json.dumps(clean_notebook(p, footer)), encoding="utf-8")
        lines.append(f"- [{p.stem}]({p.name})" + (f", the exercises of [{back.stem}](../nbs/{back.name})" if back else ""))
    (stage/"exercises"/"index.md").write_text("\n".join(lines) + "\n")
    modules = api_pages(stage)
    readme = (ROOT/"README.md").read_text(encoding="utf-8")
    (stage/"index.md").write_text(home_page(readme, [f"nbs/{p.stem}" for p in chapters], [f"nbs/{p.stem}" for p in tooling],
                                            [f"exercises/{p.stem}" for p in exercises.values()]), encoding="utf-8")
    static = stage/"_static"/"mathjax"
    for part in MATHJAX_PARTS:
        src = mathjax/part
        if src.is_dir(): shutil.copytree(src, static/part)
        elif src.exists(): static.joinpath(part).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, static/part)
    license_file = mathjax.parent/"LICENSE"
    if license_file.exists(): shutil.copy2(license_file, static/"LICENSE")
    return 1 + len(notebooks) + len(exercises) + 1 + 1 + len(modules)


def build(output: Path, mathjax: Path, quiet: bool = True) -> int:
    "Build the site into `output` (replaced); returns Sphinx's exit code."
    from sphinx.cmd.build import build_main
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptm-course-site-") as tmp:
        stage = Path(tmp)/"src"
        pages = stage_sources(stage, mathjax)
        shutil.copy2(ROOT/"docs"/"conf.py", stage/"conf.py")   # so that `_static/` (MathJax) is the staged one
        html = Path(tmp)/"html"                              # myst-nb writes a jupyter_execute/ beside the output
        args = ["-b", "html", "-d", str(Path(tmp)/"doctrees"), "-j", "auto", "--keep-going"]
        code = build_main(args + (["-q"] if quiet else []) + [str(stage), str(html)])
        if output.exists(): shutil.rmtree(output)
        shutil.move(html, output)
    print(f"{'built' if code == 0 else 'FAILED to build'} {pages} pages into {output} in {time.perf_counter() - t0:.1f} s"
          + ("" if code == 0 else f" (sphinx exit code {code})"))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="_site", help="folder to write the site to (replaced; default: _site)")
    parser.add_argument("--mathjax", help="MathJax 3's es5 folder (default: node_modules/mathjax/es5 after `npm ci`)")
    parser.add_argument("--verbose", action="store_true", help="show Sphinx's progress, not only its warnings")
    args = parser.parse_args(argv)
    return build(Path(args.output).resolve(), find_mathjax(args.mathjax), quiet=not args.verbose)


if __name__ == "__main__":
    sys.exit(main())
