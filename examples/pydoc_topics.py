"""Write an ADGEN-style data set (`{"content": ..., "summary": ...}` per line) from real text every Python has:
the language reference's help topics (`pydoc_data.topics`, the text `help("assert")` shows). The content is a
topic's heading, the summary its first paragraph of prose. Used to evaluate fine-tuning on real, offline data:

    python examples/pydoc_topics.py /tmp/pydoc            # -> /tmp/pydoc/train.jsonl, /tmp/pydoc/dev.jsonl
    glmkit finetune --data /tmp/pydoc/train.jsonl --output /tmp/pydoc/lora
    glmkit eval --data /tmp/pydoc/dev.jsonl [--adapter /tmp/pydoc/lora]

Every fourth topic (in the module's order) goes to dev, the rest to train.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pydoc_data.topics import topics

PROMPT = "Python language reference, in one paragraph: {}"


def first_paragraph(text: str) -> tuple[str, str] | None:
    """(heading, its first paragraph of prose: not grammar or code, not a line leading into one), or None."""
    lines = text.strip("\n").splitlines()
    if len(lines) < 2 or not re.fullmatch(r"[*=]+", lines[1].strip()):
        return None
    heading = lines[0].strip()
    for p in re.split(r"\n[ \t]*\n", "\n".join(lines[2:])):
        p = p.strip("\n")
        if not p.strip() or p.startswith((" ", "\t")) or re.fullmatch(r"[*=\-]+", p.splitlines()[-1].strip()):
            continue  # grammar, code or a sub-heading
        prose = " ".join(p.split())
        aside = prose.startswith("(") or prose.lower().startswith(("new in version", "changed in version"))
        if len(prose) >= 40 and not prose.endswith(":") and not aside:
            return heading, prose
    return None


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "pydoc-topics")
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in (first_paragraph(text) for text in topics.values()) if r is not None]
    splits = {"train": [], "dev": []}
    for i, (heading, summary) in enumerate(rows):
        record = {"content": PROMPT.format(heading), "summary": summary}
        splits["dev" if i % 4 == 3 else "train"].append(json.dumps(record, ensure_ascii=False) + "\n")
    for name, lines in splits.items():
        (out / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    print(f"{len(rows)} topics: {len(rows) - len(rows) // 4} in {out / 'train.jsonl'}, {len(rows) // 4} in "
          f"{out / 'dev.jsonl'}")


if __name__ == "__main__":
    main()
