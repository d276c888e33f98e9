"""The benchmarks' shared docs writer."""

from lmforge.benchmark import write_docs_section


def test_section_is_replaced_between_its_markers_and_appended_when_absent(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n<!-- a:start -->\nold\n<!-- a:end -->\ntail\n")
    write_docs_section(docs, "a", "new")
    write_docs_section(docs, "b", "second")
    assert docs.read_text() == ("# Benchmarks\n\nintro\n<!-- a:start -->\nnew\n<!-- a:end -->\ntail\n\n"
                                "<!-- b:start -->\nsecond\n<!-- b:end -->\n")
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temp file left behind
