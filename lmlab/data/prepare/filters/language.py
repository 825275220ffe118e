"""Optional language identification.

fastText's ``lid.176`` (used by CCNet/FineWeb) needs a model download, which this
project cannot rely on. Backends, tried in this order by ``backend="auto"``:

- ``lingua`` (``pip install lingua-language-detector``): models ship in the wheel;
- ``langdetect`` (``pip install langdetect``): pure Python, profiles in the wheel,
  made deterministic by fixing its seed;
- ``stopwords``: no dependency, English only. The score is the fraction of
  word tokens that are common English function words. On the DCLM English web
  sample the median is 0.39 and 99% of pages score above 0.11; French or German
  prose scores about 0, so the default cut is 0.1. Tables and keyword lists in
  English can score low too: it is a heuristic, not a language identifier, and
  can only say "English-like or not".

The library backends are imported lazily, only when selected, and a missing one
is reported as a ``ConfigError`` naming the package to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lmlab.data.prepare.filters.base import DocumentFilter, FilterResult, check_fraction, check_positive
from lmlab.data.prepare.stats import DocStats, word_tokens
from lmlab.errors import ConfigError

# The 100 most frequent English function words (articles, pronouns,
# prepositions, auxiliaries, conjunctions); content words are left out so
# the score reflects grammar, not topic.
ENGLISH_FUNCTION_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during
    each few for from further had has have having he her here hers him his how i if
    in into is it its itself just me more most my no nor not now of off on once only
    or other our out over own same she should so some such than that the their them
    then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your
    """.split()
)

BACKENDS = ("auto", "lingua", "langdetect", "stopwords")


def english_stopword_score(text: str) -> float:
    """Fraction of word tokens that are English function words (0 for empty text)."""
    tokens = word_tokens(text)
    if not tokens:
        return 0.0
    return sum(1 for t in tokens if t in ENGLISH_FUNCTION_WORDS) / len(tokens)


def available_backends() -> list[str]:
    """Backends usable in this environment, best first."""
    out = []
    try:
        import lingua  # noqa: F401

        out.append("lingua")
    except ImportError:
        pass
    try:
        import langdetect  # noqa: F401

        out.append("langdetect")
    except ImportError:
        pass
    out.append("stopwords")
    return out


def _lingua_scorer(languages: tuple[str, ...]) -> Callable[[str], dict[str, float]]:
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().build()
    targets = {code: Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in languages}

    def score(text: str) -> dict[str, float]:
        return {code: float(detector.compute_language_confidence(text, lang)) for code, lang in targets.items()}

    return score


def _langdetect_scorer(languages: tuple[str, ...]) -> Callable[[str], dict[str, float]]:
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0  # langdetect samples randomly; a fixed seed makes it repeatable

    def score(text: str) -> dict[str, float]:
        try:
            found = {r.lang.split("-")[0]: r.prob for r in detect_langs(text)}
        except LangDetectException:
            found = {}
        return {code: float(found.get(code, 0.0)) for code in languages}

    return score


@dataclass
class LanguageParams:
    """Keep documents whose score for one of ``languages`` (ISO 639-1) reaches the threshold.

    ``min_confidence`` applies to the library backends (0.65 as in FineWeb's
    fastText threshold); ``min_stopword_fraction`` to the ``stopwords`` backend.
    Only the first ``max_chars`` characters are examined, for speed.
    """

    languages: tuple[str, ...] = ("en",)
    backend: str = "auto"
    min_confidence: float = 0.65
    min_stopword_fraction: float = 0.1
    max_chars: int = 5000

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                "language.backend", f"unknown backend {self.backend!r}", f"use one of {', '.join(BACKENDS)}"
            )
        self.languages = tuple(c.lower() for c in self.languages)
        if not self.languages:
            raise ConfigError("language.languages", "is empty", "list ISO 639-1 codes, e.g. [en]")
        check_fraction("language.min_confidence", self.min_confidence)
        check_fraction("language.min_stopword_fraction", self.min_stopword_fraction)
        check_positive("language.max_chars", self.max_chars)


class LanguageFilter(DocumentFilter):
    """Language identification filter; reason ``wrong_language`` (see the module docstring for backends)."""

    name = "language"
    Params = LanguageParams

    def _setup(self) -> None:
        p = self.params
        backend = p.backend
        if backend == "auto":
            backend = available_backends()[0]
        if backend == "stopwords" and p.languages != ("en",):
            raise ConfigError(
                "language.languages",
                f"the stopwords backend only scores English, got {list(p.languages)}",
                "install lingua-language-detector or langdetect, or keep languages: [en]",
            )
        try:
            if backend == "lingua":
                self._scorer = _lingua_scorer(p.languages)
            elif backend == "langdetect":
                self._scorer = _langdetect_scorer(p.languages)
            else:
                self._scorer = lambda text: {"en": english_stopword_score(text)}
        except ImportError as err:
            package = "lingua-language-detector" if backend == "lingua" else backend
            raise ConfigError(
                "language.backend",
                f"{backend} is not installed ({err})",
                f"pip install {package}, or use backend: stopwords",
            ) from err
        self.backend = backend
        self._threshold = p.min_stopword_fraction if backend == "stopwords" else p.min_confidence

    def scores(self, text: str) -> dict[str, float]:
        """Score per configured language for ``text`` (first ``max_chars`` characters)."""
        return self._scorer(text[: self.params.max_chars])

    def check(self, stats: DocStats) -> FilterResult:
        if max(self.scores(stats.text).values()) >= self._threshold:
            return True, None
        return False, "wrong_language"
