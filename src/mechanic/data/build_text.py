"""Build the shipped text files from public-domain texts inside Debian packages (see SOURCES.md).

The .txt files next to this script are the shipped product; this is how they were made, kept so
they can be rebuilt. Reflows hard-wrapped lines into paragraphs, drops markup (dictfmt header,
_italics_ underscores, {cross-reference} braces, verse attributions) and groups paragraphs into
passages of about `PASSAGE_CHARS` characters, one passage per blank-line-separated block. Usage:

    apt-get download dict-devil miscfiles && dpkg -x dict-devil_*.deb x && dpkg -x miscfiles_*.deb x
    python -m mechanic.data.build_text x
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
PASSAGE_CHARS = 1500


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each reflowed to one line of plain prose."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        # a right-aligned verse attribution ("G.J.", "Joram Tate") closes a quotation: drop it
        lines = [ln for ln, raw in zip(lines, [r for r in block.splitlines() if r.strip()])
                 if not (raw.startswith(" " * 40))]
        para = " ".join(lines)
        para = para.replace("_", "").replace("{", "").replace("}", "")
        para = re.sub(r"\s+", " ", para).strip()
        if para:
            out.append(para)
    return out


def passages(paras: list[str], size: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive paragraphs grouped until a passage reaches `size` characters."""
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(x) + 1 for x in cur) >= size:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def devils_dictionary(root: Path) -> list[str]:
    raw = gzip.open(root / "usr/share/dictd/devil.dict.dz", "rt", encoding="latin-1").read()
    start = raw.index("PREFACE")
    body = raw[start + len("PREFACE"):]
    body = body[: body.rindex("abcdefghijklmnopqrstuvwxyz")]
    return paragraphs(body)


def founding_documents(root: Path) -> list[str]:
    paras = []
    for name in ("us-declaration.gz", "us-constitution.gz"):
        text = gzip.open(root / "usr/share/state" / name, "rt", encoding="latin-1").read()
        # headings ("Article I", "Section 2") are kept as their own short paragraphs
        paras += paragraphs(text)
    return paras


def write(path: Path, blocks: list[str]) -> None:
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    print(f"{path.name}: {len(blocks)} passages, {path.stat().st_size} bytes")


def main(root: str) -> None:
    r = Path(root)
    write(HERE / "devils_dictionary.txt", passages(devils_dictionary(r)))
    write(HERE / "founding_documents.txt", passages(founding_documents(r)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
