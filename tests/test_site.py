"""The course website: built offline from the notebooks, and read in headless Chromium with the network cut off.

Every page is opened from `file://` with every non-local request blocked and recorded; the test asserts that there
were none, that every internal link and image resolves, that chapter 1's math is typeset by the site's own MathJax,
and that the site's search finds chapter 5 for "masked". Screenshots of chapters 1 and 4 are written to
`test-output/site/` (or `$PTM_TEST_OUTPUT/site/`) for a person to look at."""
import importlib.util
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from browser_helpers import browser_required, chromium

ROOT = Path(__file__).resolve().parents[1]
def _build_site_module():
    spec = importlib.util.spec_from_file_location("build_site", ROOT/"scripts"/"build_site.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    build_site = _build_site_module()
    if not (ROOT/"node_modules"/"mathjax"/"es5"/"tex-svg.js").exists():
        message = "MathJax is not installed: run `npm ci` in the repository (the website serves it itself)"
        if browser_required(): pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("site")/"_site"
    assert build_site.main(["--output", str(out)]) == 0
    return out


def test_find_mathjax_names_the_fix_when_it_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="npm ci"): _build_site_module().find_mathjax(str(tmp_path))


def test_clean_cell_drops_directives_hidden_cells_and_progress_widgets():
    clean = _build_site_module().clean_cell
    widget = {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {}, "text/plain": "0%|"}}
    printed = {"output_type": "stream", "name": "stdout", "text": "99.0 %\n"}
    cell = {"cell_type": "code", "source": "#| export\ndef f(): pass", "outputs": [widget, printed], "metadata": {}}
    assert clean(cell)["source"] == "def f(): pass" and clean(cell)["outputs"] == [printed]
    assert clean({"cell_type": "code", "source": "#| hide\nfrom nbdev import *", "outputs": [], "metadata": {}}) is None
    assert clean({"cell_type": "code", "source": "#| default_exp core", "outputs": [], "metadata": {}}) is None


def _pages(site: Path) -> list[Path]:
    "The site's pages (the theme's `_static/` holds HTML templates that are not pages)."
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


class _Page(HTMLParser):
    "The ids, links and images of one HTML page."
    def __init__(self):
        super().__init__(); self.ids, self.links, self.images = set(), [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        if tag == "img" and a.get("src"): self.images.append(a["src"])


def _parse(path: Path) -> _Page:
    page = _Page(); page.feed(path.read_text(encoding="utf-8")); return page


def test_the_site_has_every_page_and_no_broken_internal_link_or_image(site):
    pages = _pages(site)
    names = {p.relative_to(site).as_posix() for p in pages}
    chapters = {f"nbs/{p.stem}.html" for p in (ROOT/"nbs").glob("*.ipynb") if p.stem != "index"}
    exercises = {f"exercises/{p.stem}.html" for p in (ROOT/"exercises").glob("*.ipynb")}
    assert {"index.html", "search.html", "api/index.html", "exercises/index.html"} | chapters | exercises <= names
    assert any(n.startswith("api/") and "optim" in n for n in names)
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for page, html in parsed.items():
        for ref in html.links + html.images:
            url = urlsplit(ref)
            if url.scheme or ref.startswith("//") or ref.startswith("mailto:"): continue
            target = (page.parent/unquote(url.path)).resolve() if url.path else page
            if target.is_dir(): target = target/"index.html"
            if not target.exists(): broken.append(f"{page.relative_to(site)} -> {ref}"); continue
            if url.fragment and target.suffix == ".html" and target in parsed and url.fragment not in parsed[target].ids:
                broken.append(f"{page.relative_to(site)} -> {ref} (no such anchor)")
    assert not broken, "broken internal links or images:\n" + "\n".join(broken[:40])


def test_chapters_link_their_exercises_and_hide_nbdev_directives(site):
    chapter1 = (site/"nbs"/"01_gradient_descent.html").read_text(encoding="utf-8")
    assert "../exercises/01_gradient_descent.html" in chapter1
    for page in site.glob("nbs/*.html"):
        assert not re.search(r"#\|\s*(export|hide|default_exp)", page.read_text(encoding="utf-8")), page.name


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def offline_page(browser):
    "A page whose requests outside `file://` are blocked and recorded, as are local files that fail to load."
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    external, failed = [], []
    def route(r):
        if r.request.url.startswith(("file://", "data:", "blob:", "about:")): r.continue_()
        else: external.append(r.request.url); r.abort()
    context.route("**/*", route)
    page = context.new_page()
    page.on("requestfailed", lambda req: failed.append(f"{req.url} ({req.failure})"))
    page.external, page.failed = external, failed
    yield page
    context.close()


def test_every_page_loads_with_no_external_request_and_no_missing_file(site, offline_page):
    page = offline_page
    broken_images = []
    for path in _pages(site):
        page.goto(path.as_uri(), wait_until="load")
        broken_images += [f"{path.relative_to(site)}: {src}" for src in page.evaluate(
            "[...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")]
    assert page.external == [], f"pages asked the network for: {sorted(set(page.external))[:20]}"
    assert page.failed == [], f"local files that failed to load: {page.failed[:20]}"
    assert broken_images == []


def _screenshot_dir() -> Path:
    out = Path(os.environ.get("PTM_TEST_OUTPUT", ROOT/"test-output"))/"site"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_chapter_1_math_is_typeset_by_the_sites_own_mathjax(site, offline_page):
    page = offline_page
    page.goto((site/"nbs"/"01_gradient_descent.html").as_uri(), wait_until="load")
    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
    page.evaluate("MathJax.startup.promise")
    typeset = page.locator("mjx-container").count()
    assert typeset > 20, f"only {typeset} formulas typeset on chapter 1"
    assert page.locator("mjx-merror").count() == 0, "MathJax reported TeX errors on chapter 1"
    assert page.evaluate("[...document.scripts].some(s => s.src && new URL(s.src).pathname.endsWith('/_static/mathjax/tex-svg.js'))")
    page.locator("mjx-container[display='true']").first.scroll_into_view_if_needed()
    page.screenshot(path=str(_screenshot_dir()/"chapter_01.png"), full_page=False)
    assert page.external == []


def test_chapter_4_shows_its_figures(site, offline_page):
    page = offline_page
    page.goto((site/"nbs"/"04_mnist.html").as_uri(), wait_until="load")
    sizes = page.evaluate("[...document.images].map(i => i.naturalWidth)")
    assert len(sizes) >= 3 and min(sizes) > 0
    page.locator("img").nth(1).scroll_into_view_if_needed()
    page.screenshot(path=str(_screenshot_dir()/"chapter_04.png"), full_page=False)


def test_search_finds_chapter_5_for_masked(site, offline_page):
    page = offline_page
    page.goto((site/"search.html").as_uri() + "?q=masked", wait_until="load")
    page.wait_for_function("document.querySelectorAll('#search-results li a').length > 0", timeout=30_000)
    hits = page.evaluate("[...document.querySelectorAll('#search-results li a')].map(a => a.getAttribute('href'))")
    assert any("05_bert_pretraining" in h for h in hits), hits[:10]
    assert page.external == []
