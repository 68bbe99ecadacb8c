from __future__ import annotations

import re
from pathlib import Path

import pytest

from glmkit.errors import GlmkitError, InvalidParameterError
from glmkit.rag import Document, Section
from glmkit.rag.chunking import split
from glmkit.rag.loaders import SUPPORTED, UnreadableDocument, find_files, load

CHINESE = ("部署ChatGLM模型需要一张显卡。请先安装驱动程序，然后运行命令！如果显存不够怎么办？"
           "可以选择量化模型；四比特量化只需要大约六个G的显存。")


def count_tokens(text: str) -> int:
    """Roughly the chat model's tokens: one per 1.5 characters."""
    return int(len(text) / 1.5 + 0.999)


def words(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_gbk_text_file_decodes(tmp_path):
    path = tmp_path / "说明.txt"
    path.write_bytes(("中文测试。\n\n\n\n" + CHINESE + "\x00").encode("gbk"))
    document = load(path, "说明.txt")
    assert document.source == "说明.txt"
    assert document.sections == (Section("中文测试。\n\n" + CHINESE),)


def test_short_gbk_text_is_not_mistaken_for_korean(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("中文测试。".encode("gbk"))
    assert load(path, "a.txt").sections[0].text == "中文测试。"


def test_utf8_with_bom_and_spaces_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone   two\t\tthree\r\nfour\x07".encode("utf-8"))
    assert load(path, "a.txt").sections[0].text == "one two three\nfour"


def test_markdown_headings_and_fences(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("---\ntitle: front matter\n---\nIntro line.\n\n# Install\nGet it.\n\n## From source\n"
                    "```bash\n# not a heading\nmake install\n```\nDone.\n\nSetext\n======\nUnder setext.\n\n"
                    "Child\n-----\nUnder child.\n\n- item\n---\nAfter rule.\n### Deep ###\nDeep text.\n", "utf-8")
    sections = load(path, "guide.md").sections
    assert [(s.heading, s.text) for s in sections] == [
        ("", "Intro line."),
        ("Install", "Get it."),
        ("Install > From source", "```bash\n# not a heading\nmake install\n```\nDone."),
        ("Setext", "Under setext."),
        ("Setext > Child", "Under child.\n\n- item\n---\nAfter rule."),
        ("Setext > Child > Deep", "Deep text."),
    ]


def test_html_drops_furniture_and_keeps_structure(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes("""<html><head><meta charset="gbk"><title>网页标题</title><style>p {color: red}</style></head>
<body><nav><a href="/">首页</a> 导航</nav><header>页眉</header><script>var x = "脚本";</script>
<p>前言，在任何标题之前。</p>
<h2>第一节</h2><p>第一段
  跨行的文字。</p><p>第二段。</p>
<ul><li>列表一</li><li>列表二</li></ul>
<h3>小节 <small>A</small></h3><table><tr><th>名称</th><th>值</th></tr><tr><td>显存</td><td>6G</td></tr></table>
<pre>line one
    indented</pre>
<h2>第二节</h2><p>结束<br>换行。</p><!-- 注释 --><footer>页脚</footer></body></html>""".encode("gbk"))
    sections = load(path, "page.html").sections
    assert [(s.heading, s.text) for s in sections] == [
        ("网页标题", "前言，在任何标题之前。"),
        ("网页标题 > 第一节", "第一段跨行的文字。\n\n第二段。\n\n列表一\n列表二"),
        ("网页标题 > 第一节 > 小节 A", "名称 | 值\n显存 | 6G\n\nline one\nindented"),
        ("网页标题 > 第二节", "结束\n换行。"),
    ]
    text = "".join(s.text for s in sections)
    for furniture in ("首页", "导航", "页眉", "脚本", "color", "注释", "页脚"):
        assert furniture not in text


def test_html_title_is_not_a_heading_when_there_is_an_h1(tmp_path):
    path = tmp_path / "page.htm"
    path.write_text("<title>Site</title><h1>Top</h1><p>a</p><h2>Sub</h2><p>b</p>", "utf-8")
    assert [(s.heading, s.text) for s in load(path, "page.htm").sections] == [("Top", "a"), ("Top > Sub", "b")]


def make_pdf(path: Path, pages: list[tuple[str, str]]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for title, body in pages:
        pdf.add_page()
        if title:
            level, _, name = title.partition(":")
            pdf.start_section(name, level=int(level))
            pdf.cell(text=name, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(w=0, text=body)
    pdf.output(str(path))


def test_pdf_pages_and_outline(tmp_path):
    path = tmp_path / "manual.pdf"
    make_pdf(path, [("0:Introduction", "Welcome to the manual. It explains the install."),
                    ("1:Hardware", "You need one GPU with six gigabytes."),
                    ("", "Continued on the third page without a bookmark.")])
    sections = load(path, "manual.pdf").sections
    assert [(s.heading, s.page) for s in sections] == [
        ("Introduction", 1), ("Introduction > Hardware", 2), ("Introduction > Hardware", 3)]
    assert sections[0].text.startswith("Introduction\nWelcome to the manual.")
    assert "six gigabytes" in sections[1].text
    assert sections[2].text == "Continued on the third page without a bookmark."


def test_pdf_without_outline_has_pages_only(tmp_path):
    path = tmp_path / "plain.pdf"
    make_pdf(path, [("", "First page."), ("", "Second page.")])
    assert load(path, "plain.pdf").sections == (Section("First page.", "", 1), Section("Second page.", "", 2))


def test_corrupt_pdf_is_unreadable(tmp_path):
    good = tmp_path / "good.pdf"
    make_pdf(good, [("", "Some text. " * 50)])
    path = tmp_path / "old.pdf"
    path.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UnreadableDocument) as caught:
        load(path, "manuals/old.pdf")
    assert caught.value.source == "manuals/old.pdf"
    assert str(caught.value).startswith("manuals/old.pdf: not a readable pdf (")
    assert str(caught.value).endswith("; skipped")


def test_pdf_without_text_is_unreadable(tmp_path):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 50, 50, style="F")
    path = tmp_path / "scan.pdf"
    pdf.output(str(path))
    with pytest.raises(UnreadableDocument, match=r"scan\.pdf: no text layer in 1 pages .*OCR"):
        load(path, "scan.pdf")


def test_encrypted_pdf_is_unreadable(tmp_path):
    import pypdf

    plain = tmp_path / "plain.pdf"
    make_pdf(plain, [("", "Secret text.")])
    writer = pypdf.PdfWriter(clone_from=str(plain))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    path = tmp_path / "locked.pdf"
    with open(path, "wb") as out:
        writer.write(out)
    with pytest.raises(UnreadableDocument, match="encrypted"):
        load(path, "locked.pdf")


def test_docx_headings_and_table(tmp_path):
    import docx

    document = docx.Document()
    document.add_heading("Handbook", level=0)
    document.add_paragraph("Opening words.")
    document.add_heading("Setup", level=1)
    document.add_paragraph("Install the driver.")
    table = document.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, [("GPU", "Memory"), ("A100", "80 GB")]):
        for cell, value in zip(row.cells, values):
            cell.text = value
    document.add_heading("Drivers", level=2)
    document.add_paragraph("Use version 535.")
    document.add_heading("Usage", level=1)
    document.add_paragraph("Run glmkit.")
    path = tmp_path / "handbook.docx"
    document.save(str(path))
    assert [(s.heading, s.text) for s in load(path, "handbook.docx").sections] == [
        ("Handbook", "Opening words."),
        ("Handbook > Setup", "Install the driver.\nGPU | Memory\nA100 | 80 GB"),
        ("Handbook > Setup > Drivers", "Use version 535."),
        ("Handbook > Usage", "Run glmkit."),
    ]


def test_corrupt_docx_and_empty_file_are_unreadable(tmp_path):
    (tmp_path / "bad.docx").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UnreadableDocument, match="bad.docx: not a readable docx"):
        load(tmp_path / "bad.docx", "bad.docx")
    (tmp_path / "empty.md").write_text("# Only a heading\n\n   \n", "utf-8")
    with pytest.raises(UnreadableDocument, match="empty.md: no text; skipped"):
        load(tmp_path / "empty.md", "empty.md")


def test_find_files_names_and_skips(tmp_path):
    docs = tmp_path / "docs"
    for name in ("b.md", "a.TXT", "guide/install.md", "guide/deep/x.pdf", "notes.json", ".hidden.md",
                 ".git/config.md", "guide/.cache/y.md"):
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text("x", "utf-8")
    single = tmp_path / "single.html"
    single.write_text("x", "utf-8")
    assert find_files([docs, single]) == [
        (docs / "a.TXT", "a.TXT"), (docs / "b.md", "b.md"), (docs / "guide/deep/x.pdf", "guide/deep/x.pdf"),
        (docs / "guide/install.md", "guide/install.md"), (single, "single.html")]
    with pytest.raises(GlmkitError, match="missing: no such file"):
        find_files([tmp_path / "missing"])
    with pytest.raises(GlmkitError, match=r"'\.json'.*\.txt, \.md, \.markdown, \.html, \.htm, \.pdf, \.docx"):
        find_files([docs / "notes.json"])
    assert ".docx" in SUPPORTED


def chinese_document(repeat: int = 12) -> Document:
    return Document("faq.txt", (Section(CHINESE * repeat, "常见问题", None), Section("第二节只有一句话。", "其他", 2)))


def test_chinese_chunks_end_at_sentence_ends_within_size():
    chunks = split(chinese_document(), count_tokens, size=60, overlap=15)
    first = [chunk for chunk in chunks if chunk.heading == "常见问题"]
    assert len(first) > 5
    for chunk in first:
        assert count_tokens(chunk.text) <= 60
        assert chunk.text[-1] in "。！？；"
        assert chunk.text[0] in "部请如可四"
        assert (chunk.source, chunk.page) == ("faq.txt", None)


def test_chunks_overlap_and_cover_the_text():
    text = "".join(f"第{i}步，安装第{i}个组件{end}" for i, end in zip(range(60), "。！？；" * 15))
    chunks = [c.text for c in split(Document("steps.txt", (Section(text),)), count_tokens, size=60, overlap=15)]
    assert len(chunks) > 5
    joined = chunks[0]
    for before, after in zip(chunks, chunks[1:]):
        shared = next(k for k in range(len(after), 0, -1) if before.endswith(after[:k]))
        assert 0 < count_tokens(after[:shared]) <= 15 and after[:shared][-1] in "。！？；"
        joined += after[shared:]
    assert joined == text


def test_chunks_never_cross_sections():
    chunks = split(chinese_document(2), count_tokens, size=300, overlap=50)
    assert [(c.heading, c.page, c.text) for c in chunks] == [
        ("常见问题", None, CHINESE * 2), ("其他", 2, "第二节只有一句话。")]


def test_jieba_counted_english_and_chinese_mix():
    import jieba

    def jieba_tokens(text: str) -> int:
        return sum(1 for word in jieba.cut(text) if word.strip())

    text = ("Pi is 3.14 and e is 2.71, see e.g. the manual. Then run it! " + "他说：“好的。”然后离开了。\n- 列表项\n") * 30
    chunks = split(Document("mix.md", (Section(text),)), jieba_tokens, size=40, overlap=8)
    assert all(jieba_tokens(c.text) <= 40 for c in chunks)
    assert not any(c.text.startswith(("14", "71", "”")) for c in chunks)
    assert all(not c.text.endswith(("3.", "2.")) for c in chunks)
    assert set(words(text)) == set("".join(words(c.text) for c in chunks))


def test_long_sentence_is_cut_into_fitting_pieces():
    sentence = "没有标点的长句子" * 40 + "。"
    spaced = " ".join(f"word{i}" for i in range(200)) + "."
    chunks = split(Document("long.txt", (Section(sentence + "\n" + spaced),)), count_tokens, size=50, overlap=10)
    assert all(0 < count_tokens(c.text) <= 50 for c in chunks)
    assert "".join(words(c.text) for c in chunks if "word" not in c.text).count("没有标点的长句子") >= 40
    english = [c.text for c in chunks if "word" in c.text]
    assert all(re.fullmatch(r"[\w ]*(word\d+)\.?", text) for text in english)
    assert all(re.fullmatch(r"word\d+", token) or token == "word199." for c in english for token in c.split())
    assert {f"word{i}" for i in range(200)} <= {token.rstrip(".") for text in english for token in text.split()}


def test_chunk_count_is_checked_on_the_whole_chunk():
    def merging_badly(text: str) -> int:
        return len(text) + 3 * text.count("\n")

    text = "\n".join(f"line {i}." for i in range(40))
    chunks = split(Document("x", (Section(text),)), merging_badly, size=30, overlap=0)
    assert all(merging_badly(c.text) <= 30 for c in chunks)
    assert words("".join(c.text for c in chunks)) == words(text)


@pytest.mark.parametrize("size, overlap, field", [(0, 0, "size"), (-5, 0, "size"), (100, 100, "overlap"),
                                                  (100, -1, "overlap"), (2.5, 0, "size")])
def test_bad_size_or_overlap(size, overlap, field):
    with pytest.raises(InvalidParameterError) as caught:
        split(chinese_document(), count_tokens, size=size, overlap=overlap)
    assert caught.value.field == field
