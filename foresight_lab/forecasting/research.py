"""Research: passages retrieved from sources the user registered with the lab.

    lab.add_source("notes", ["notes/fed.md", "notes/ecb.md"])          # local documents
    lab.add_source("wiki", [{"url": ..., "title": ..., "text": ...}])  # documents in memory
    lab.add_source("search", lambda query, k: [...])                   # any Python callable

A request with `research: true` asks every registered source, `{"sources": [...]}`
the named ones. Local documents are split into passages and ranked with BM25; a
callable returns its own passages (dicts or `Passage`s with url, title and text). The
passages go into the model's context before the question and come back as the reply's
`url_citation` annotations.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

from foresight_lab.engine.request import InvalidRequestError

PASSAGE_WORDS = 120  # documents are split into passages of about this many words
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Passage:
    url: str
    title: str
    text: str


# Words too common to say what a passage is about.
_STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "there",
        "these",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "which",
        "who",
        "will",
        "with",
        "would",
    ]
)


def _words(text: str) -> list[str]:
    return [w for w in map(str.lower, _WORD.findall(text)) if w not in _STOP_WORDS]


def _document(item, where: str) -> Passage:
    if isinstance(item, Passage):
        return item
    if isinstance(item, str | pathlib.Path):
        path = pathlib.Path(item).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file: {path}")
        return Passage(path.resolve().as_uri(), path.name, path.read_text(encoding="utf-8"))
    if isinstance(item, Mapping) and isinstance(item.get("text"), str):
        url = str(item.get("url") or "")
        return Passage(url, str(item.get("title") or url), item["text"])
    raise TypeError(
        f"{where}: a document is a file path, a Passage, or a dict with 'text' (and 'url', "
        f"'title'); got {type(item).__name__}"
    )


def _split(document: Passage) -> list[Passage]:
    """Passages of about PASSAGE_WORDS words, cut at paragraph breaks where possible."""
    passages, current = [], []
    for paragraph in re.split(r"\n\s*\n", document.text):
        words = paragraph.split()
        while words:
            room = PASSAGE_WORDS - len(current)
            current.extend(words[:room])
            words = words[room:]
            if len(current) >= PASSAGE_WORDS:
                passages.append(current)
                current = []
        if len(current) >= PASSAGE_WORDS // 2:
            passages.append(current)
            current = []
    if current:
        passages.append(current)
    return [dataclasses.replace(document, text=" ".join(words)) for words in passages]


class DocumentSource:
    """Local documents, ranked against the question with Okapi BM25 (k1=1.5, b=0.75)."""

    def __init__(self, documents: Sequence, name: str = "documents"):
        items = [documents] if isinstance(documents, str | pathlib.Path | Mapping) else documents
        self.passages = [
            p
            for i, item in enumerate(items)
            for p in _split(_document(item, f"source {name!r}, document {i}"))
        ]
        self._counts = [collections.Counter(_words(p.title + " " + p.text)) for p in self.passages]
        self._lengths = [sum(c.values()) for c in self._counts]
        self._frequency = collections.Counter(w for c in self._counts for w in c)

    def __call__(self, query: str, k: int) -> list[Passage]:
        n = len(self.passages)
        if not n:
            return []
        average = sum(self._lengths) / n
        terms = set(_words(query))
        scores = []
        for counts, length in zip(self._counts, self._lengths, strict=True):
            score = 0.0
            for term in terms & counts.keys():
                df = self._frequency[term]
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                tf = counts[term]
                score += idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * length / average))
            scores.append(score)
        ranked = sorted(range(n), key=lambda i: -scores[i])
        return [self.passages[i] for i in ranked[:k] if scores[i] > 0]


Retriever = Callable[[str, int], Sequence]


class Sources:
    """The research sources a lab knows, by name."""

    def __init__(self):
        self._sources: dict[str, Retriever] = {}

    def add(self, name: str, source) -> None:
        """Registers documents (paths, dicts, Passages) or a callable `(query, k) -> passages`."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a source needs a non-empty name")
        self._sources[name] = source if callable(source) else DocumentSource(source, name)

    def remove(self, name: str) -> None:
        self._sources.pop(name, None)

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def chosen(self, research, param: str = "research") -> list[str]:
        """The source names a request's `research` value asks for ([] for none)."""
        if research is None or research is False:
            return []
        if research is True:
            names = self.names
        elif isinstance(research, Mapping) and set(research) <= {"sources"}:
            names = research.get("sources")
            if names is None:
                names = self.names
        elif isinstance(research, Sequence) and not isinstance(research, str):
            names = research
        else:
            raise InvalidRequestError(
                f'{param}: must be true, false, or {{"sources": [names]}}, got {research!r}', param
            )
        if not isinstance(names, Sequence) or isinstance(names, str):
            raise InvalidRequestError(
                f"{param}.sources: must be a list of source names", f"{param}.sources"
            )
        if not self._sources:
            raise InvalidRequestError(
                f"{param}: no research sources are registered with this lab; register one "
                "with lab.add_source(name, documents) first",
                param,
            )
        unknown = [n for n in names if n not in self._sources]
        if unknown:
            raise InvalidRequestError(
                f"{param}.sources: unknown source {unknown[0]!r}; registered sources: "
                f"{', '.join(self.names)}",
                f"{param}.sources",
            )
        if not names:
            raise InvalidRequestError(
                f"{param}.sources: name at least one source", f"{param}.sources"
            )
        return list(dict.fromkeys(names))

    def retrieve(self, query: str, names: Sequence[str], k: int = 3) -> list[Passage]:
        """The k best passages of each named source, in order, without repeats."""
        found: list[Passage] = []
        for name in names:
            for i, item in enumerate(self._sources[name](query, k) or []):
                passage = _document(item, f"source {name!r}, result {i}")
                if passage not in found:
                    found.append(passage)
        return found
