"""Text to train and evaluate dictionaries on: user files (.txt, .jsonl, directories) or the default corpus.

The default corpus is GCIDE, the GNU Collaborative International Dictionary of English (Webster's
1913 plus later additions; GPL-2+), about 40 MB of English definitions and quotations (~10M SmolLM2
tokens) from the Debian package `dict-gcide`. It is not committed: `make setup` runs
`python -m mechanic.features.corpus --install`, which unpacks the package's data file into mechanic's
cache (no dictionary server is installed). Every fifth passage is held out for evaluation, as in
mechanic.data.text. Licence and provenance: mechanic/data/SOURCES.md.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from mechanic.features.errors import FeaturesError

GCIDE = "gcide.dict.dz"
SYSTEM = Path("/usr/share/dictd") / GCIDE
HELDOUT_EVERY = 5
PASSAGE_CHARS = 1500
_MARKUP = [(re.compile(r"\\[^\\\n]*\\"), ""), (re.compile(r"\[(?:1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1913 Suppl\.|RN)[^\]]*\]"), ""),
           (re.compile(r"[{}]"), ""), (re.compile(r"\s+"), " ")]


def cache_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("mechanic")) / "corpus" / GCIDE


def corpus_file() -> Path | None:
    """The GCIDE data file if present: $MECHANIC_CORPUS, mechanic's cache, or the system dictd directory."""
    for p in (os.environ.get("MECHANIC_CORPUS"), cache_path(), SYSTEM):
        if p and Path(p).is_file():
            return Path(p)
    return None


def install() -> Path:
    """Fetch the Debian package dict-gcide with apt-get download and unpack its data file into the cache."""
    if corpus_file() is not None:
        return corpus_file()
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FeaturesError("The default corpus comes from the Debian package dict-gcide, and this machine has no "
                            "apt-get/dpkg-deb. Train on your own text instead (--text FILE.txt or .jsonl), or set "
                            "MECHANIC_CORPUS to a copy of gcide.dict.dz.")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "dict-gcide"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("dict-gcide_*.deb"))
        if got.returncode != 0 or not debs:
            raise FeaturesError(f"apt-get download dict-gcide failed ({got.stderr.strip()[-300:]}); run "
                                "'apt-get update' first, or train on your own text (--text).")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        src = Path(tmp) / "x" / "usr" / "share" / "dictd" / GCIDE
        dst = cache_path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst.with_suffix(".part"))
        os.replace(dst.with_suffix(".part"), dst)
    return dst


def _clean(block: str) -> str:
    for pat, rep in _MARKUP:
        block = pat.sub(rep, block)
    return block.strip()


def default_passages(split: str = "train") -> Iterator[str]:
    """Passages (~1,500 characters of whole dictionary entries) of the default corpus; split 'train' or 'heldout'."""
    if split not in ("train", "heldout", "all"):
        raise FeaturesError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    path = corpus_file()
    if path is None:
        raise FeaturesError("The default corpus (GCIDE, Debian package dict-gcide) is not installed. Run "
                            "`python -m mechanic.features.corpus --install` (make setup does), or give your own "
                            "text files with --text.")
    i, buf = 0, []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
                continue
            text = _clean("".join(block)) if block else ""
            block = []
            if len(text) < 40 or text.startswith("00-database"):
                continue
            buf.append(text)
            if sum(len(b) for b in buf) >= PASSAGE_CHARS:
                held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
                if split == "all" or held == (split == "heldout"):
                    yield "\n\n".join(buf)
                i, buf = i + 1, []


def file_passages(paths: Iterable) -> Iterator[str]:
    """Passages from text files (blank-line separated), JSONL files (a 'text' field per line) or directories of them."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl", ".md"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"No text file or directory at {p}.")
    if not files:
        raise FeaturesError("No .txt, .md or .jsonl files found in the given text paths.")
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.open(encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FeaturesError(f"{f}:{n} is not JSON ({e}).") from None
                text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
                if not isinstance(text, str):
                    raise FeaturesError(f"{f}:{n}: each JSONL line needs a string field 'text'.")
                yield text
        else:
            for block in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if block.strip():
                    yield block.strip()


def _is_path(t) -> bool:
    if isinstance(t, Path):
        return True
    if not isinstance(t, str) or len(t) > 1024 or "\n" in t:
        return False
    try:
        return Path(t).expanduser().exists()
    except OSError:
        return False


def passages(text=None, split: str = "train") -> Iterator[str]:
    """Text for training/evaluation: None = the default corpus split, a path or list of paths, or a list of str."""
    if text is None:
        return default_passages(split)
    if _is_path(text):
        return file_passages([text])
    if isinstance(text, (list, tuple)) and text and all(_is_path(t) for t in text):
        return file_passages(text)
    if isinstance(text, str):
        return iter([text])
    return iter(text)


if __name__ == "__main__":
    if "--install" in sys.argv:
        print(f"default corpus: {install()}")
    else:
        print(corpus_file() or "not installed (python -m mechanic.features.corpus --install)")
