"""`glmkit kb`: knowledge bases built from your own files, for `glmkit chat --kb`, the server and the web page.

    glmkit kb create manuals ./docs/        # txt, md, html, pdf, docx; run it again to take in what changed
    glmkit kb add manuals new.pdf           # one more file (or folder)
    glmkit kb remove manuals old.pdf        # by the name `kb list manuals` shows
    glmkit kb list [manuals]                # the knowledge bases, or one's files
    glmkit kb delete manuals
    glmkit kb search manuals "报销需要哪些材料？" --top-k 5 [--json]

Chunks are sized in the chat model's tokens (--model, default the embedded model: only its tokenizer loads).
Nothing heavy is imported before the flags are checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .args import existing_path, integer, one_of

MODES = ("hybrid", "keyword", "dense")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="kb_command", metavar="ACTION", required=True)
    paths = existing_path("PATH", "pass files or folders that exist")

    def action(name: str, help_text: str):
        a = sub.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--kb-dir", default=None, metavar="DIR", help="where knowledge bases live (default "
                       "$GLMKIT_HOME/kb, else ~/.local/share/glmkit/kb)")
        return a

    def indexing(a) -> None:
        a.add_argument("--model", default=None, help="the chat model whose tokens size the chunks (a local "
                       "folder or .gguf; default: the embedded model)", type=existing_path(
                           "--model", "pass a local model folder or .gguf file, or omit it"))

    create = action("create", "create a knowledge base from files and folders; run again to update it")
    create.add_argument("name")
    create.add_argument("paths", nargs="+", metavar="PATH", type=paths)
    indexing(create)
    create.add_argument("--embedding-model", default="default", metavar="PATH",
                        help="a local sentence-transformers folder (e.g. bge-small-zh for Chinese), 'default' "
                        "(all-MiniLM-L6-v2, English) or 'none' (keyword search only)")
    create.add_argument("--chunk-tokens", default=300, metavar="N", help="chunk size in tokens (default 300)",
                        type=integer("--chunk-tokens", 32, 4096, fix="e.g. --chunk-tokens 300"))
    create.add_argument("--overlap", default=50, metavar="N", help="tokens repeated between neighbouring chunks "
                        "(default 50)", type=integer("--overlap", 0, 2048, fix="e.g. --overlap 50"))
    add = action("add", "add files or folders to a knowledge base (changed files are re-indexed)")
    add.add_argument("name")
    add.add_argument("paths", nargs="+", metavar="PATH", type=paths)
    indexing(add)
    remove = action("remove", "remove files from a knowledge base, by the names `kb list NAME` shows")
    remove.add_argument("name")
    remove.add_argument("sources", nargs="+", metavar="FILE")
    listing = action("list", "list the knowledge bases, or the files of one")
    listing.add_argument("name", nargs="?")
    listing.add_argument("--json", action="store_true", help="print JSON")
    delete = action("delete", "delete a knowledge base and its index (your files are not touched)")
    delete.add_argument("name")
    search = action("search", "show the passages a question retrieves")
    search.add_argument("name")
    search.add_argument("query")
    search.add_argument("--top-k", default=5, metavar="K", help="passages to show (default 5)",
                        type=integer("--top-k", 1, 100, fix="e.g. --top-k 5"))
    search.add_argument("--mode", default="hybrid", type=one_of("--mode", MODES),
                        help="hybrid (default), keyword or dense")
    search.add_argument("--json", action="store_true",
                        help="print a JSON list of {source, heading, page, text, score}")
    search.add_argument("--reranker", default=None, metavar="PATH", help="a local cross-encoder folder (e.g. "
                        "bge-reranker-base) that orders the candidates", type=existing_path(
                            "--reranker", "pass a local sentence-transformers CrossEncoder folder"))


def chat_tokenizer(model: str | None):
    """(name, tokenizer) of the chat model whose tokens size the chunks; for the embedded model only its
    tokenizer is read (converting it once if no chat has run yet)."""
    from ..tokenizers import load_tokenizer

    if model and not model.endswith(".gguf"):
        return Path(model).name, load_tokenizer(Path(model).expanduser())
    if model:
        from ..models.gguf import ensure_converted

        return Path(model).name, load_tokenizer(ensure_converted(Path(model).expanduser()))
    from ..models import default

    built = next((d for d in (default.default_start_dir(), default.float_dir()) if default.is_built(d)), None)
    return default.NAME, load_tokenizer(built or default.ensure_float_dir())


def knowledge(args, embedding: str | None = "default"):
    from ..rag.service import Knowledge, embedding_spec

    root = Path(args.kb_dir).expanduser() if args.kb_dir else None
    if args.kb_command in ("create", "add"):
        name, tokenizer = chat_tokenizer(args.model)
        return Knowledge(lambda text: len(tokenizer.encode(text)), name, root, embedding_spec(embedding))
    return Knowledge(len, "", root, None, reranker=getattr(args, "reranker", None))  # no chunking: no tokenizer


def main(args) -> int:
    from ..rag import require

    require()
    embedding = getattr(args, "embedding_model", "default")
    if args.kb_command == "create":
        from ..rag.service import embedding_spec

        embedding_spec(embedding)  # a bad path fails before the tokenizer loads
    k = knowledge(args, embedding)
    try:
        return ACTIONS[args.kb_command](k, args)
    finally:
        k.close()


def _create(k, args) -> int:
    paths = [Path(p) for p in args.paths]
    if k.library.exists(args.name):
        kb = k.open(args.name)
        print(f"knowledge base {args.name!r} exists: updating it from {', '.join(args.paths)} (files no longer "
              "there are removed)", file=sys.stderr)
        report = k.add(args.name, paths, prune=True)
    else:
        kb = k.create(args.name, args.chunk_tokens, args.overlap)
        try:
            report = k.add(args.name, paths)
        except BaseException:
            if not kb.files():  # nothing was indexed: leave no empty knowledge base behind
                k.delete(args.name)
            raise
    _print_report(args.name, report)
    return 0


def _add(k, args) -> int:
    _print_report(args.name, k.add(args.name, [Path(p) for p in args.paths]))
    return 0


def _print_report(name: str, report) -> None:
    for source, reason in report.skipped:
        print(f"skipped {source}: {reason}", file=sys.stderr)
    print(f"{name}: {report.summary()}")


def _remove(k, args) -> int:
    from ..errors import GlmkitError

    kb = k.open(args.name)
    known = {f.source for f in kb.files()}
    missing = [s for s in args.sources if s not in known]
    if missing:
        sample = ", ".join(sorted(known)[:5]) + (" ..." if len(known) > 5 else "")
        raise GlmkitError(f"{args.name!r} has no file {missing[0]!r}; its files: {sample or '(none)'} "
                          f"(glmkit kb list {args.name} shows them all)")
    for source in args.sources:
        kb.remove(source)
    print(f"{args.name}: removed {len(args.sources)} file{'s' if len(args.sources) != 1 else ''}")
    return 0


def _list(k, args) -> int:
    if args.name is None:
        rows = []
        for name in k.library.names():
            kb = k.open(name)
            files = kb.files()
            rows.append({"name": name, "files": len(files), "chunks": kb.count(),
                         "embedding": kb.settings.embedding or "none (keyword only)"})
        if args.json:
            print(json.dumps(rows, ensure_ascii=False, indent=2))
        elif not rows:
            print(f"no knowledge bases in {k.library.root}; create one with: glmkit kb create NAME FOLDER")
        else:
            for r in rows:
                print(f"{r['name']:<24} {r['files']:>6} files {r['chunks']:>8} chunks  embedding: {r['embedding']}")
        return 0
    files = k.open(args.name).files()
    if args.json:
        print(json.dumps([vars(f) for f in files], ensure_ascii=False, indent=2))
    for f in [] if args.json else files:
        print(f"{f.source:<48} {f.chunks:>6} chunks  added {f.added}")
    return 0


def _delete(k, args) -> int:
    k.open(args.name)  # an unknown name says which exist
    k.delete(args.name)
    print(f"deleted knowledge base {args.name!r}")
    return 0


def _search(k, args) -> int:
    from ..rag.answer import where

    hits = k.search(args.name, args.query, args.top_k, args.mode)
    if args.json:
        print(json.dumps([h.citation() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("nothing relevant found")
    for n, hit in enumerate(hits, 1):
        text = " ".join(hit.chunk.text.split())
        print(f"[{n}] {where(hit)}  (score {hit.score:.3f})\n    {text[:300]}{' ...' if len(text) > 300 else ''}")
    return 0


ACTIONS = {"create": _create, "add": _add, "remove": _remove, "list": _list, "delete": _delete, "search": _search}
