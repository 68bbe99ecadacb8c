"""Keyword tokens, the same for what is indexed and what is asked, so a question's words meet a passage's.

Chinese runs are segmented by jieba in search mode (long words also yield their parts, so 软件包 meets 软件);
every other run of word characters is lowercased and, when plain English, stemmed ("installing packages" meets
"install a package"). Numbers and codes stay whole ("e1234", "8080", "max_queue"; an option name with "_" also
yields its parts, so "max queue" finds it). A short stopword list drops the words that every question and
passage share, so they neither match everything nor count toward how much of a question a passage covers."""

from __future__ import annotations

import logging
import re
import threading

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUNS = re.compile(rf"([{_HAN}]+)|([^\W{_HAN}]+)")
STOPWORDS = frozenset("""
的 地 得 了 着 过 是 在 和 与 及 或 也 都 就 而 之 其 这 那 这个 那个 这些 那些 我 你 您 他 她 它 我们 你们 他们
吗 呢 吧 啊 呀 个 一个 有 没有 把 被 对 从 向 给 让 将 请 请问 什么 怎么 怎样 如何 哪 哪些 哪个 哪里 为什么 多少
需要 可以 能 能够 应该 要 会
a an the of to in on at by for from with into about as is are was were be been being am it its this that these
those and or but not no nor if then than so do does did doing can could should would will shall may might must
i me my you your he him his she her we us our they them their there here what which who whom whose how why when
where please
""".split())

_lock = threading.Lock()
_jieba = None
_local = threading.local()


def words(text: str) -> list[str]:
    """The keyword tokens of `text`, in order, repeats kept (they count toward BM25's term frequency)."""
    out: list[str] = []
    for han, other in _RUNS.findall(text):
        if han:
            out.extend(w for w in _segment(han) if w not in STOPWORDS)
        else:
            out.extend(_latin(other.lower()))
    return out


def _latin(word: str) -> list[str]:
    """One lowercased run: a code kept whole (plus its parts when it has "_"), a plain word stemmed."""
    if "_" in word:
        parts = [p for p in word.split("_") if p]
        return ([word] if len(parts) > 1 else []) + [t for p in parts for t in _latin(p)]
    if word in STOPWORDS:
        return []
    if word.isascii() and word.isalpha():
        return [_stem(word)]
    return [word]


def _segment(han: str) -> list[str]:
    tokenizer = _jieba or _load_jieba()
    return tokenizer.lcut_for_search(han)


def _load_jieba():
    """jieba's dictionary takes about a second to load: once, on first use, whichever thread gets there."""
    global _jieba
    with _lock:
        if _jieba is None:
            import jieba

            jieba.setLogLevel(logging.WARNING)  # "Building prefix dict ..." on every first use
            jieba.initialize()
            _jieba = jieba
    return _jieba


def _stem(word: str) -> str:
    """PyStemmer's stemmers are not thread-safe (they keep a cache): one per thread."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        import Stemmer

        stemmer = _local.stemmer = Stemmer.Stemmer("english")
    return stemmer.stemWord(word)


def language(text: str) -> str:
    """'zh' when a fair share (a fifth) of the letters are Chinese characters, else 'en'."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "en"
    han = sum(bool(re.match(f"[{_HAN}]", c)) for c in letters)
    return "zh" if han / len(letters) >= 0.2 else "en"
