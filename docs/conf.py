"""Sphinx configuration of the course website.

`python scripts/build_site.py --output _site` stages the README, the chapter notebooks (with their saved outputs),
the student exercises and an API reference into a temporary folder and builds it with this file. The site works
offline: nothing is executed, and nothing is fetched from the network at build time or when a page is opened
(MathJax is served from the site's own `_static/mathjax/`, copied there from the npm package `mathjax@3`)."""

project = "ptm-course"
author = "ptm-course maintainers"
copyright = "the ptm-course maintainers, Apache-2.0"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.mathjax"]

# The notebooks are shown with the outputs they were saved with: a reader sees the figures of a full-mode run.
nb_execution_mode = "off"
nb_ipywidgets_js = {}             # no widget JavaScript from a CDN (build_site.py drops the stale progress bars)
nb_merge_streams = True           # one block per cell for what a cell printed
nb_output_stderr = "remove"       # warnings of the run that saved the outputs are noise on a web page
nb_mime_priority_overrides = [("html", "application/vnd.ptm-course.check+json", None)]  # check results: shown as HTML
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# MathJax 3 with SVG output, from the site itself: SVG needs no web fonts.
mathjax_path = "mathjax/tex-svg.js"
mathjax3_config = {"loader": {"load": ["[tex]/boldsymbol"]}, "svg": {"fontCache": "global"}}

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
default_role = "literal"          # the library's docstrings write `name` for code, as Markdown does

html_theme = "sphinx_book_theme"
html_title = "ptm-course: pretrained models, from the gradient up"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
    "show_navbar_depth": 1,
}
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_static_path = ["_static"]    # in the staged sources, where build_site.py puts MathJax
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "misc.highlighting_failure"]


def escape_bars(app, what, name, obj, options, lines):
    "Docstrings write |x| for a norm or an absolute value, which reStructuredText reads as a substitution."
    for i, line in enumerate(lines):
        parts = line.split("`")                       # even parts are outside `code`
        lines[i] = "`".join(p.replace("|", r"\|") if j % 2 == 0 else p for j, p in enumerate(parts))


def setup(app):
    app.connect("autodoc-process-docstring", escape_bars)
