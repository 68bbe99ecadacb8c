"""Read the user's files into Documents, keeping the structure (heading path, page) that citations point at."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import GlmkitError
from . import Document, Section

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")

logging.getLogger("pypdf").setLevel(logging.ERROR)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_CHINESE_ENCODINGS = ("gb2312", "gbk", "gb18030", "big5", "cp950", "big5hkscs", "hz")
_CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
_DIGITS = re.compile(r"\d+")
_CJK_END = re.compile(r"[\u4e00-\u9fff，、“（《]$")
_CJK_START = re.compile(r"[\u4e00-\u9fff，。、：；！？”）》]")
_CJK_BREAK = re.compile(r"(?<=[\u4e00-\u9fff，、“（《])[ \t]*\n\s*(?=[\u4e00-\u9fff，。、：；！？”）》])")  # wrapped Chinese


class UnreadableDocument(GlmkitError):
    """A file that cannot give any text: the indexer skips it and reports why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}; skipped")
        self.source = source
        self.reason = reason


def find_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """The files to read, each with the name the knowledge base cites it by: relative to the folder it was found
    in, so the same folder added from anywhere gives the same names."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if not path.exists():
            raise GlmkitError(f"{path}: no such file or folder; check the path")
        if path.is_dir():
            found.extend((file, file.relative_to(path).as_posix()) for file in _walk(path))
        elif path.suffix.lower() in SUPPORTED:
            found.append((path, path.name))
        else:
            raise GlmkitError(f"{path}: cannot read {path.suffix or 'files without a suffix'!r}; "
                              f"supported file types are {', '.join(SUPPORTED)}")
    return found


def _walk(folder: Path) -> list[Path]:
    """Supported files under `folder`, sorted, leaving out hidden files and never entering hidden folders (.git)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(Path(root, name) for name in names
                     if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED)
    return sorted(files, key=lambda file: file.relative_to(folder).as_posix())


def load(path: Path, source: str) -> Document:
    """One file as a Document; UnreadableDocument when it holds no usable text."""
    suffix = path.suffix.lower()
    readers = {".txt": _txt, ".md": _markdown, ".markdown": _markdown, ".html": _html, ".htm": _html,
               ".pdf": _pdf, ".docx": _docx}
    if suffix not in readers:
        raise GlmkitError(f"{source}: cannot read {suffix!r}; supported file types are {', '.join(SUPPORTED)}")
    try:
        parts = readers[suffix](path, source)
    except OSError as e:
        raise UnreadableDocument(source, f"cannot read the file ({e.strerror or e})") from e
    cleaned = ((heading, page, _clean(text)) for heading, page, text in parts)
    sections = tuple(Section(text, heading, page) for heading, page, text in cleaned if text)
    if not sections:
        raise UnreadableDocument(source, "no text")
    return Document(source, sections)


def _clean(text: str) -> str:
    """Light normalisation: one space for a run of spaces, at most one blank line, no control characters."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _decode(data: bytes, declared: str | None = None) -> str:
    """Text from bytes of unknown encoding. UTF-8 first; Chinese GBK/GB18030 files are common and short ones
    are often mistaken for Korean or Latin encodings by detection alone, so a clean GB18030 decode that gives
    Chinese text wins over a non-Chinese guess."""
    import charset_normalizer

    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    candidates = ["utf-8"] + ([_encoding_name(declared)] if declared else [])
    for encoding in candidates:
        try:
            return data.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    best = charset_normalizer.from_bytes(data).best()
    if best is not None and best.encoding in _CHINESE_ENCODINGS:
        return data.decode(_encoding_name(best.encoding), errors="replace")
    chinese = _as_chinese(data)
    if chinese is not None:
        return chinese
    return str(best) if best is not None else data.decode("utf-8", errors="replace")


def _encoding_name(name: str) -> str:
    """GB2312 and GBK files often hold characters only their superset GB18030 has."""
    name = name.lower().replace("_", "-")
    return "gb18030" if name in ("gb2312", "gbk", "cp936", "x-gbk") else name


def _as_chinese(data: bytes) -> str | None:
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        return None
    wide = [char for char in text if ord(char) > 127]
    return text if wide and sum(1 for char in wide if _CJK.match(char)) >= 0.9 * len(wide) else None


def _txt(path: Path, source: str) -> list[tuple[str, int | None, str]]:
    return [("", None, _decode(path.read_bytes()))]


_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_NOT_PARAGRAPH = re.compile(r" {0,3}(?:[-*+>|]|\d+[.)])(?:\s|$)|\s*$")


def _markdown(path: Path, source: str) -> list[tuple[str, int | None, str]]:
    """Sections at ATX (#) and setext (underlined) headings; code fences are text, whatever they contain."""
    lines = _front_matter_removed(_decode(path.read_bytes()).splitlines())
    parts: list[tuple[str, int | None, str]] = []
    stack: list[tuple[int, str]] = []
    body: list[str] = []
    fence = ""

    def start(level: int, title: str) -> None:
        parts.append((_path(stack), None, "\n".join(body)))
        body.clear()
        _push(stack, level, title)

    for line in lines:
        opening = _FENCE.match(line)
        if fence:
            if _closes(line, fence):
                fence = ""
            body.append(line)
        elif opening:
            fence = opening.group(1)
            body.append(line)
        elif atx := _ATX.fullmatch(line):
            start(len(atx.group(1)), atx.group(2) or "")
        elif _SETEXT.fullmatch(line) and body and _is_paragraph_line(body[-1], body[-2] if len(body) > 1 else ""):
            title = body.pop()
            start(1 if line.strip()[0] == "=" else 2, title.strip())
        else:
            body.append(line)
    parts.append((_path(stack), None, "\n".join(body)))
    return parts


def _closes(line: str, fence: str) -> bool:
    closing = line.strip()
    return len(closing) >= len(fence) and closing == fence[0] * len(closing) and len(line) - len(line.lstrip()) < 4


def _is_paragraph_line(line: str, before: str) -> bool:
    """A setext underline makes a heading of a one-line paragraph; under a list item or after more paragraph
    lines a line of dashes is a rule, not a heading."""
    return not _NOT_PARAGRAPH.match(line) and not _FENCE.match(line) and not before.strip()


def _front_matter_removed(lines: list[str]) -> list[str]:
    """YAML front matter is metadata, and its closing '---' would read as a setext heading."""
    if lines and lines[0].strip() == "---":
        for i, line in enumerate(lines[1:], 1):
            if line.strip() in ("---", "..."):
                return lines[i + 1:]
    return lines


def _push(stack: list[tuple[int, str]], level: int, title: str) -> None:
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, " ".join(title.split())))


def _path(stack: list[tuple[int, str]]) -> str:
    return " > ".join(title for _, title in stack if title)


_DROPPED = ("script", "style", "nav", "header", "footer", "noscript", "template", "head", "title")
_NAVIGATION = {"role": ["navigation", "banner", "contentinfo"]}
_NAVIGATION_CLASSES = ("navheader", "navfooter")  # DocBook's previous/next bars, which are not in a <nav>
_BLOCKS = frozenset("address article aside blockquote caption dd details div dl dt fieldset figcaption figure "
                    "form hr li main ol p pre section summary table tbody tfoot thead tr ul".split())
_LINES = frozenset(("dd", "dt", "li", "tr"))  # one line each; other blocks are set apart by a blank line
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_WHITESPACE = re.compile(r"\s+")
_META_CHARSET = re.compile(rb"""(?:charset|encoding)\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _html(path: Path, source: str) -> list[tuple[str, int | None, str]]:
    """Sections at h1..h6; page furniture (navigation, scripts, headers, footers) left out."""
    from bs4 import BeautifulSoup

    data = path.read_bytes()
    declared = _META_CHARSET.search(data[:4096])
    soup = BeautifulSoup(_decode(data, declared.group(1).decode("ascii") if declared else None), "html.parser")
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for tag in soup.find_all(_DROPPED):
        tag.decompose()
    for tag in soup.find_all(attrs=_NAVIGATION) + soup.find_all(class_=_NAVIGATION_CLASSES):
        tag.decompose()
    stack = [(0, title)] if title and soup.find("h1") is None else []
    return _html_parts(soup.body or soup, stack)


def _html_parts(root, stack: list[tuple[int, str]]) -> list[tuple[str, int | None, str]]:
    """Walks the tree in document order (iteratively: deep nesting must not hit the recursion limit): blocks on
    lines of their own, table cells joined by " | ", the source's whitespace kept only inside <pre>."""
    from bs4 import NavigableString, Tag
    from bs4.element import PreformattedString

    parts: list[tuple[str, int | None, str]] = []
    text: list[str] = []
    todo: list[tuple[object, bool]] = [(root, False)]
    while todo:
        node, pre = todo.pop()
        if isinstance(node, Tag):
            if node.name in _HEADINGS:
                parts.append((_path(stack), None, "".join(text)))
                text.clear()
                _push(stack, _HEADINGS[node.name], " ".join(node.get_text().split()))  # inline markup: no gaps
                continue
            if node.name == "br":
                text.append("\n")
                continue
            if node.name in _BLOCKS:
                text.append("\n")
                if node.name not in _LINES:
                    todo.append(("\n", pre))
            children = list(node.children)
            if node.name == "tr":
                cells = [child for child in children if isinstance(child, Tag) and child.name in ("td", "th")]
                children = [item for cell in cells for item in (" | ", cell)][1:]
            todo.extend((child, pre or node.name == "pre") for child in reversed(children))
        elif isinstance(node, PreformattedString):
            continue
        elif isinstance(node, NavigableString):
            text.append(str(node) if pre else _WHITESPACE.sub(" ", _CJK_BREAK.sub("", node)))
        else:
            text.append(node)
    parts.append((_path(stack), None, "".join(text)))
    return parts


def _pdf(path: Path, source: str) -> list[tuple[str, int | None, str]]:
    """A section per page, or per outline entry within a page where the bookmark's title is found on it."""
    import pypdf

    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(source, "an encrypted pdf (needs a password); save a copy without one")
        texts = [_page_text(page) for page in reader.pages]
    except UnreadableDocument:
        raise
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise UnreadableDocument(source, f"not a readable pdf ({e or type(e).__name__})") from e
    if not any(text.strip() for text in texts):
        raise UnreadableDocument(source, f"no text layer in {len(texts)} pages (a scanned pdf? run OCR on it first)")
    starts = _outline(reader)
    furniture = _running_lines(texts)
    parts: list[tuple[str, int | None, str]] = []
    heading = ""
    for index, text in enumerate(texts):
        text = _joined_cjk_lines(_without_furniture(text, furniture))
        position = 0
        for title, heading_path in starts.get(index, []):
            found = _title_position(text, title, position)
            if found is not None:
                parts.append((heading, index + 1, text[position:found]))
                position = found
            heading = heading_path
        parts.append((heading, index + 1, text[position:]))
    return parts


def _running_lines(texts: list[str]) -> set[str]:
    """Running headers and footers ("Debian Reference 13/233"): a first or last line that, numbers aside, is
    on at least half of the pages. Left in, each would be a stray section between two bookmarks."""
    if len(texts) < 4:
        return set()
    seen: dict[str, int] = {}
    for text in texts:
        lines = text.strip().split("\n")
        for line in {_numberless(lines[0]), _numberless(lines[-1])} - {""}:
            seen[line] = seen.get(line, 0) + 1
    return {line for line, count in seen.items() if count >= len(texts) / 2}


def _without_furniture(text: str, furniture: set[str]) -> str:
    lines = text.strip().split("\n")
    while lines and _numberless(lines[0]) in furniture:
        lines.pop(0)
    while lines and _numberless(lines[-1]) in furniture:
        lines.pop()
    return "\n".join(lines)


def _numberless(line: str) -> str:
    return _DIGITS.sub("#", line.strip())


def _page_text(page) -> str:
    """One damaged page costs that page, not the document."""
    try:
        return page.extract_text() or ""
    except Exception:
        logging.getLogger(__name__).debug("unreadable pdf page", exc_info=True)
        return ""


def _outline(reader) -> dict[int, list[tuple[str, str]]]:
    """Bookmarks by the 0-based page they start on, in document order: (title, heading path)."""
    starts: dict[int, list[tuple[str, str]]] = {}

    def walk(items: list, parents: list[str]) -> None:
        title = ""
        for item in items:
            if isinstance(item, list):
                walk(item, parents + [title] if title else parents)
                continue
            title = " ".join(str(item.title or "").split())
            page = reader.get_destination_page_number(item)
            if page is not None and page >= 0 and title:
                starts.setdefault(page, []).append((title, " > ".join(parents + [title])))

    try:
        walk(reader.outline, [])
    except Exception:  # a damaged outline costs the headings, not the text
        logging.getLogger(__name__).debug("unreadable pdf outline", exc_info=True)
    return starts


def _title_position(text: str, title: str, start: int) -> int | None:
    """Where a bookmark's title begins on its page, taking in a leading section number ("1.2.9 ") on its line."""
    pattern = r"\s*".join(re.escape(word) for word in title.split())
    match = re.search(pattern, text[start:])
    if match is None:
        return None
    found = start + match.start()
    line_start = max(text.rfind("\n", start, found) + 1, start)
    return line_start if re.fullmatch(r"[\d.]*\s*", text[line_start:found]) else found


def _joined_cjk_lines(text: str) -> str:
    """A pdf's text layer breaks Chinese sentences at every line end. Chinese has no spaces to lose, so a full
    line (a short one ends a heading or paragraph) ending and followed by Chinese characters runs on."""
    lines = text.split("\n")
    full = 0.6 * max(_width(line) for line in lines)
    joined = [lines[0]]
    for before, line in zip(lines, lines[1:]):
        if _width(before) >= full and _CJK_END.search(before) and _CJK_START.match(line):
            joined[-1] += line
        else:
            joined.append(line)
    return "\n".join(joined)


def _width(line: str) -> int:
    return len(line) + len(_CJK.findall(line))


def _docx(path: Path, source: str) -> list[tuple[str, int | None, str]]:
    """Sections at paragraphs styled Title / Heading N; tables as lines of cells joined by " | "."""
    import docx
    from docx.table import Table

    try:
        document = docx.Document(str(path))
        blocks = list(document.iter_inner_content())
    except Exception as e:  # python-docx raises zip, xml and key errors on damaged files
        raise UnreadableDocument(source, f"not a readable docx ({e or type(e).__name__})") from e
    parts: list[tuple[str, int | None, str]] = []
    stack: list[tuple[int, str]] = []
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            body.extend(_table_rows(block))
            continue
        level = _heading_level(block.style.name if block.style is not None else "")
        if level is None:
            body.append(block.text)
        elif block.text.strip():
            parts.append((_path(stack), None, "\n".join(body)))
            body.clear()
            _push(stack, level, block.text)
    parts.append((_path(stack), None, "\n".join(body)))
    return parts


def _heading_level(style: str) -> int | None:
    """Title is the outermost level; Chinese Word names its heading styles "标题 N"."""
    if style.lower() in ("title", "标题"):
        return 0
    match = re.fullmatch(r"(?:heading|标题)\s*(\d)", style.strip(), re.IGNORECASE)
    return int(match.group(1)) if match else None


def _table_rows(table) -> list[str]:
    rows = []
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:
            if id(cell._tc) not in seen:  # a merged cell is returned once per grid column it spans
                seen.add(id(cell._tc))
                cells.append(" ".join(cell.text.split()))
        rows.append(" | ".join(cells))
    return rows
