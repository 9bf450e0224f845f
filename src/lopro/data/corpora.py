"""Text corpora: built-in `wiki` and `news`, or any local .txt/.jsonl file.

Every corpus is a list of documents, split deterministically into calibration and evaluation
documents that never overlap (every `eval_every`-th document goes to evaluation).
"""
from __future__ import annotations

import bz2
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lopro.data.assets import AssetError, cache_dir, package_dir
from lopro.io.atomic import atomic_write

log = logging.getLogger(__name__)

GENSIM_HINT = "pip install gensim==4.4.0"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
MIN_WIKI_CHARS = 2000


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[str, ...]
    eval_every: int = 4

    def split(self, part: str) -> str:
        """'calib' or 'eval' text, documents joined by blank lines."""
        if part not in ("calib", "eval"):
            raise ValueError(f"split must be 'calib' or 'eval', got {part!r}")
        docs = self.documents
        if len(docs) < 2:  # one document: first 3/4 calibrates, the last quarter evaluates
            text = docs[0] if docs else ""
            cut = len(text) * 3 // 4
            return text[:cut] if part == "calib" else text[cut:]
        pick = [d for i, d in enumerate(docs) if (i % self.eval_every == 0) == (part == "eval")]
        return "\n\n".join(pick)


def _gensim_data(name: str) -> Path:
    folder = package_dir("gensim", GENSIM_HINT) / "test" / "test_data"
    path = folder / name
    if not path.exists():
        raise AssetError(f"{path} is missing; reinstall gensim: {GENSIM_HINT}")
    return path


def _wiki_documents() -> list[str]:
    cached = cache_dir() / "wiki-docs.jsonl"
    if cached.exists():
        return [json.loads(line) for line in cached.read_text().splitlines()]
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(_gensim_data(WIKI_FILE)) as fh:
        for _title, raw, _pageid in extract_pages(fh):
            if not raw or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(filter_wiki(raw))
            if len(text) >= MIN_WIKI_CHARS:
                docs.append(text)
    atomic_write(cached, "\n".join(json.dumps(d) for d in docs))
    return docs


def _clean_wiki(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if ln)
    text = re.sub(r"'{2,}", "", text)  # bold/italic wiki markup left by filter_wiki
    return re.sub(r"[ \t]+", " ", text)


def _news_documents() -> list[str]:
    lines = _gensim_data(NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


MIN_TEXT_SHARE = 0.9  # of characters that decode as UTF-8 and are printable or whitespace


def check_text(text: str, path: Path) -> None:
    """Refuse a file that is mostly not text (binary bytes decoded with replacements, control codes)."""
    sample = text[:1_000_000]
    if not sample:
        raise ValueError(f"{path} is empty; calibration needs text")
    good = sum(1 for ch in sample if (ch.isprintable() or ch.isspace()) and ch != "\ufffd")
    if good / len(sample) < MIN_TEXT_SHARE:
        raise ValueError(f"{path} is not text: only {100 * good / len(sample):.0f}% of its characters are printable "
                         f"UTF-8 (at least {100 * MIN_TEXT_SHARE:.0f}% needed); give a .txt or .jsonl file of text")


def _file_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: not a JSON object ({exc.msg}); each .jsonl line must be "
                                 "an object with a 'text' field") from None
            if not isinstance(rec, dict) or "text" not in rec:
                raise ValueError(f"{path}:{i + 1}: each .jsonl line must be an object with a 'text' field")
            docs.append(str(rec["text"]))
        check_text("\n".join(docs), path)
        return docs
    text = path.read_text(encoding="utf-8", errors="replace")
    check_text(text, path)
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


BUILTIN_CORPORA = {"wiki": (_wiki_documents, 4), "news": (_news_documents, 2)}


def load_corpus(name_or_path: str) -> Corpus:
    """Built-in corpus by name (`wiki`, `news`) or a local .txt/.jsonl file."""
    if name_or_path in BUILTIN_CORPORA:
        loader, every = BUILTIN_CORPORA[name_or_path]
        return Corpus(name_or_path, tuple(loader()), every)
    path = Path(name_or_path)
    if path.suffix in (".txt", ".jsonl") and path.is_file():
        return Corpus(path.name, tuple(_file_documents(path)))
    raise ValueError(f"unknown corpus {name_or_path!r}: use one of {sorted(BUILTIN_CORPORA)} "
                     "or the path of an existing .txt or .jsonl file")
