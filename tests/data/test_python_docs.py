"""The Python docs reader: a Sphinx page's main body as text (¶ links, scripts, navigation dropped, code verbatim)."""

from __future__ import annotations

from lmforge.data.python_docs import page_files, parse_page, records

PAGE = """<html><head><title>9. Classes &#8212; Python 3.11 documentation</title><script>var x = 1;</script></head>
<body><div class="sphinxsidebar"><p>Table of contents</p></div>
<div class="body" role="main"><section id="classes"><h1>9. Classes<a class="headerlink" href="#classes">¶</a></h1>
<p>Classes provide a means of   bundling data.</p>
<div class="highlight"><pre>class A:
    x = 1
</pre></div><nav><p>next page</p></nav><script>track()</script>
<ul><li><p>one</p></li></ul></section></div>
<div class="footer"><p>Copyright</p></div></body></html>"""


def test_main_body_as_text(tmp_path) -> None:
    (tmp_path / "tutorial").mkdir()
    (tmp_path / "tutorial" / "classes.html").write_text(PAGE)
    page = parse_page(tmp_path / "tutorial" / "classes.html")
    assert page.title.startswith("9. Classes")
    assert page.text == "9. Classes\nClasses provide a means of bundling data.\nclass A:\n    x = 1\none"


def test_index_pages_and_assets_skipped(tmp_path) -> None:
    for name in ("genindex-A.html", "search.html", "_static/x.html", "library/os.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(PAGE.replace("bundling data", "bundling data " * 30))
    assert [p.relative_to(tmp_path).as_posix() for p in page_files(tmp_path)] == ["library/os.html"]
    [record] = records(tmp_path)
    assert set(record) == {"text", "source", "title"} and record["source"].endswith("library/os.html")
