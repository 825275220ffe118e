"""English word tokens as datatrove's Gopher, C4 and FineWeb filters count them.

datatrove splits English text into words with a blank spaCy English pipeline
(``load_word_tokenizer("en")``): whitespace-separated chunks, then punctuation,
quotes, currency and symbols peeled off the start and end of each chunk one at
a time, then splits inside a chunk at hyphens, slashes, colons and commas
between letters, and at a full stop between a lower- and an upper-case letter;
a table of special cases keeps abbreviations ("Mr.", "e.g.", "U.S.") and
emoticons whole and splits contractions ("don't" -> "do", "n't"). Sentences
(C4's page rule) end at a "." "!" or "?" token and the next sentence starts at
the following non-punctuation token.

:func:`words` follows those rules with plain string operations and compiled
regexes (no spaCy, no model), several times faster than the spaCy pipeline
datatrove runs (7x on the DCLM pages).
Its special-case table covers the common English abbreviations and
contractions, not spaCy's full list, so rare forms can tokenise differently;
how often that changes a filter's decision is measured in
``tests/test_filter_agreement.py``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# -- character classes --------------------------------------------------------------------------

_QUOTES = "'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
_HYPHENS = "-|–|—|--|---|——|~"
_UNITS = (
    "km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|m/s|km/h|kmh|mph|"
    "hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%"
)


def _cls(chars: str) -> str:
    return "".join(re.escape(c) for c in chars)


def _is_icon(ch: str) -> bool:
    return unicodedata.category(ch) == "So"



_PREFIX_RE = re.compile(
    r"\.\.+|…|US\$|C\$|A\$|\+(?![0-9])|[§%=—–" + _cls(_PUNCT + _QUOTES + _CURRENCY) + "]"
)
_SUFFIX_RES = (
    re.compile(r"\.\.+$|……$|…$"),
    re.compile(r"(?:'s|'S|’s|’S)$"),
    re.compile("[" + _cls(_PUNCT + _QUOTES) + "—–]$"),
    re.compile(r"(?<=[0-9])\+$"),
    re.compile(r"(?<=°[FfCcKk])\.$"),
    re.compile(r"(?<=[0-9])(?:US\$|C\$|A\$|[" + _cls(_CURRENCY) + "])$"),
    re.compile(r"(?<=[0-9])(?:" + _UNITS + r")$"),
)

_INFIX_RE = re.compile(
    r"\.\.+|…"
    r"|(?<=[0-9])[+\-*^](?=[0-9-])"
    # lower-case letter or quote, ".", upper-case letter or quote: the case is checked in _infix_spans
    r"|(?<=[^\W\d_]|[" + _cls(_QUOTES) + r"])\.(?=[^\W\d_]|[" + _cls(_QUOTES) + "])"
    r"|(?<=[^\W\d_]),(?=[^\W\d_])"
    r"|(?<=[^\W_])(?:" + _HYPHENS + r")(?=[^\W\d_])"
    r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])"
)
# URLs, bare host names with a lower-case top-level domain ("a-b.com/x-y"), e-mail addresses
_URL_RE = re.compile(
    r"^(?:(?:https?|ftp)://\S+|mailto:\S+|www\.\S+|(?:[\w-]+\.)+[a-z]{2,}(?::\d+)?(?:/\S*)?|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)$"
)

# -- special cases --------------------------------------------------------------------------------

_ABBREVIATIONS = (
    "Mr. Mrs. Ms. Dr. Prof. St. Jr. Sr. Rev. Gov. Sen. Rep. Gen. Lt. Sgt. Adm. Mt. Bros. Co. Corp. Inc. "
    "Ltd. Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. Ala. Ariz. Ark. Calif. Colo. Conn. Del. "
    "Fla. Ga. Ill. Ind. Kan. Ky. La. Md. Mass. Mich. Minn. Miss. Mo. Mont. Neb. Nev. Okla. Ore. Pa. Tenn. Va. "
    "Wash. Wis. Wyo. N.H. N.J. N.M. N.Y. N.C. N.D. S.C. S.D. D.C. U.S. U.K. E.g. E.G. I.e. I.E. e.g. i.e. a.m. "
    "p.m. vs. v. Ph.D. ph.d. Ms Mr Mrs Dr 's 'S 'd 'll 're 've 'm 'em n't '' ’’ ’s ’d ’ll ’re ’ve ’m n’t "
    "w/o and/or ol' ol’ y' y’ ‘s"
).split()
_SINGLE_LETTERS = [f"{c}." for c in "abcdefghijklmnopqrstuvwxyz"]
_EMOTICONS = (
    ":) :-) :)) :( :-( ;) ;-) :D :-D :P :-P :p :-p :/ :-/ :| :-| :o :O :-o :-O <3 </3 =) =( =D =] =[ (: ): "
    ":'( :') xD XD 8) 8-) o.O O.o ^_^ -_- >.< :3 :* :-* ;D (; ;( =/ :] :["
).split()
_NT_STEMS = (
    "do does did is are was were have has had could would should might must need ai ca wo sha dare ought"
).split()
_PRONOUNS = "i you he she it we they that there who what where when why how".split()
_PRONOUN_SUFFIXES = {
    "i": ("'m", "'ll", "'ve", "'d"),
    "you": ("'re", "'ll", "'ve", "'d"),
    "he": ("'ll", "'d"),
    "she": ("'ll", "'d"),
    "it": ("'ll", "'d"),
    "we": ("'re", "'ll", "'ve", "'d"),
    "they": ("'re", "'ll", "'ve", "'d"),
    "that": ("'ll", "'d", "'re"),
    "there": ("'ll", "'d", "'re"),
    "who": ("'re", "'ll", "'ve", "'d"),
    "what": ("'re", "'ll", "'ve", "'d"),
    "where": ("'re", "'ll", "'ve", "'d"),
    "when": ("'re", "'ll", "'d"),
    "why": ("'re", "'ll", "'d"),
    "how": ("'re", "'ll", "'ve", "'d"),
}
_MODALS_VE = "could would should might must".split()
# Apostrophe-less contractions split as if the apostrophe were there; words that are
# also ordinary English ("its", "were", "well", "shell", "wed", "ill") are left alone.
_BARE = {
    "dont": ("do", "nt"), "doesnt": ("does", "nt"), "didnt": ("did", "nt"), "isnt": ("is", "nt"),
    "arent": ("are", "nt"), "wasnt": ("was", "nt"), "werent": ("were", "nt"), "havent": ("have", "nt"),
    "hasnt": ("has", "nt"), "hadnt": ("had", "nt"), "couldnt": ("could", "nt"), "wouldnt": ("would", "nt"),
    "shouldnt": ("should", "nt"), "mightnt": ("might", "nt"), "mustnt": ("must", "nt"), "neednt": ("need", "nt"),
    "aint": ("ai", "nt"), "cant": ("ca", "nt"), "wont": ("wo", "nt"), "shant": ("sha", "nt"),
    "im": ("i", "m"), "ive": ("i", "ve"), "youre": ("you", "re"), "youve": ("you", "ve"), "youll": ("you", "ll"),
    "youd": ("you", "d"), "theyre": ("they", "re"), "theyve": ("they", "ve"), "theyll": ("they", "ll"),
    "theyd": ("they", "d"), "weve": ("we", "ve"), "itll": ("it", "ll"), "itd": ("it", "d"), "thats": ("that", "s"),
    "thatll": ("that", "ll"), "whats": ("what", "s"), "whos": ("who", "s"), "hes": ("he", "s"), "shes": ("she", "s"),
    "hed": ("he", "d"), "id": ("i", "d"), "couldve": ("could", "ve"), "wouldve": ("would", "ve"),
    "shouldve": ("should", "ve"), "mightve": ("might", "ve"), "mustve": ("must", "ve"), "gonna": ("gon", "na"),
    "gotta": ("got", "ta"), "wanna": ("wan", "na"), "cannot": ("can", "not"), "lemme": ("lem", "me"),
    "gimme": ("gim", "me"), "whatre": ("what", "re"), "whered": ("where", "d"), "howd": ("how", "d"),
    "wed": ("we", "d"), "theres": ("there", "s"), "ima": ("i", "m", "a"), "yall": ("y", "all"),
    "y'all": ("y'", "all"), "y’all": ("y’", "all"),
}


def _case_variants(pieces: tuple[str, ...]) -> list[tuple[str, ...]]:
    title = (pieces[0][:1].upper() + pieces[0][1:],) + pieces[1:]
    return [pieces, title]


@lru_cache(maxsize=1)
def _special_cases() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for w in _ABBREVIATIONS + _SINGLE_LETTERS + _EMOTICONS:
        table[w] = (w,)
    for apos in ("'", "’"):
        for stem in _NT_STEMS:
            for pieces in _case_variants((stem, f"n{apos}t")):
                table["".join(pieces)] = pieces
        for stem, sufs in _PRONOUN_SUFFIXES.items():
            for suf in sufs:
                suf = suf.replace("'", apos)
                variants = [(stem, suf), (stem[:1].upper() + stem[1:], suf)]
                if stem == "i":
                    variants = [("i", suf), ("I", suf)]
                for pieces in variants:
                    table["".join(pieces)] = pieces
        for stem in _MODALS_VE:
            for pieces in _case_variants((stem, f"{apos}ve")):
                table["".join(pieces)] = pieces
    for bare, pieces in _BARE.items():
        for variant in _case_variants(pieces):
            table["".join(variant)] = variant
    for hour in range(1, 13):
        for half in ("am", "pm", "a.m.", "p.m."):
            table[f"{hour}{half}"] = (str(hour), half)
    return table


# -- the tokenizer -----------------------------------------------------------------------------


def _find_prefix(s: str) -> int:
    m = _PREFIX_RE.match(s)
    if m:
        return m.end()
    if _is_icon(s[0]):
        return 1
    return 0


def _find_suffix(s: str) -> int:
    best = 0
    start = len(s)
    for rx in _SUFFIX_RES:
        m = rx.search(s)
        if m and m.start() < start:
            start, best = m.start(), m.end() - m.start()
    if s.endswith(".") and len(s) >= 2 and start > len(s) - 1:
        prev = s[-2]
        if not prev.isalpha() or prev.islower() or (len(s) >= 3 and prev.isupper() and s[-3].isupper()):
            start, best = len(s) - 1, 1
    if _is_icon(s[-1]) and len(s) - 1 < start:
        start, best = len(s) - 1, 1
    return best


def _infix_spans(s: str) -> list[tuple[int, int]]:
    spans = []
    for m in _INFIX_RE.finditer(s):
        a, b = m.span()
        if s[a:b] == "." and a > 0 and b < len(s):
            left, right = s[a - 1], s[b]
            quote_l, quote_r = left in _QUOTES, right in _QUOTES
            if not ((left.islower() or quote_l) and (right.isupper() or quote_r)):
                continue
        spans.append((a, b))
    for i, ch in enumerate(s):
        if _is_icon(ch):
            spans.append((i, i + 1))
    spans.sort()
    return spans


def _split_chunk(chunk: str, out: list[str], specials: dict[str, tuple[str, ...]]) -> None:
    pieces: list[str] = []
    _split_affixes(chunk, pieces, specials)
    # Special cases that span pieces ("Mr" + "." after an infix split, ")" + ":") are rejoined.
    i = 0
    while i < len(pieces):
        for k in (3, 2):
            if i + k <= len(pieces):
                joined = "".join(pieces[i : i + k])
                if joined in specials:
                    out.extend(specials[joined])
                    i += k
                    break
        else:
            out.append(pieces[i])
            i += 1


def _split_affixes(chunk: str, out: list[str], specials: dict[str, tuple[str, ...]]) -> None:
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    last = -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        pre = _find_prefix(s)
        if pre:
            rest = s[pre:]
            if rest and rest in specials:
                prefixes.append(s[:pre])
                s = rest
                break
        suf = _find_suffix(s[pre:]) if s[pre:] else 0
        if suf:
            rest = s[:-suf]
            if rest and rest in specials:
                suffixes.append(s[-suf:])
                s = rest
                break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
        if s and s in specials:
            break
    out.extend(prefixes)
    if s:
        if s in specials:
            out.extend(specials[s])
        elif _URL_RE.match(s):
            out.append(s)
        else:
            pos = 0
            for a, b in _infix_spans(s):
                if a < pos:
                    continue
                if a == 0 and b == len(s):
                    break
                if a > pos:
                    out.append(s[pos:a])
                out.append(s[a:b])
                pos = b
            if pos < len(s):
                out.append(s[pos:])
    out.extend(reversed(suffixes))


# The common shape of a chunk with punctuation: at most one opening mark, letters or digits,
# at most one closing mark ("(word", "word,", "word."). Its tokens follow directly
# unless a special case or the rules for "." after a capital are involved.
_SIMPLE_CHUNK_RE = re.compile(r"([(\[\"'“‘«]?)([^\W\d_]+|\d+)([,;:!?)\]\"'”’».]?)")


def words(text: str) -> list[str]:
    """The word tokens datatrove's English tokenizer gives ``text`` (whitespace dropped)."""
    specials = _special_cases()
    out: list[str] = []
    append = out.append
    simple = _SIMPLE_CHUNK_RE.fullmatch
    for chunk in text.split():
        # letters only or digits only: one token unless a special case ("dont", "Wed")
        if (chunk.isalpha() or chunk.isdigit()) and chunk not in specials:
            append(chunk)
            continue
        m = simple(chunk)
        if m is not None and chunk not in specials:
            lead, core, trail = m.groups()
            if (
                core not in specials
                and lead + core not in specials
                and core + trail not in specials
                and not (trail == "." and core[-1].isupper())
            ):
                if lead:
                    append(lead)
                append(core)
                if trail:
                    append(trail)
                continue
        _split_chunk(chunk, out, specials)
    return out


_SENTENCE_END = frozenset(".!?")


def _is_punct(tok: str) -> bool:
    return all(unicodedata.category(c)[0] == "P" for c in tok)


def count_sentences(text: str) -> int:
    """Sentences in ``text`` as datatrove's English sentence splitter counts them (0 for blank text)."""
    return count_sentences_in(words(text))


def count_sentences_in(toks: list[str]) -> int:
    """:func:`count_sentences` of a text given its :func:`words`."""
    if not toks:
        return 0
    n = 1
    seen_end = False
    for t in toks:
        if t in _SENTENCE_END:
            seen_end = True
        elif seen_end and not _is_punct(t):
            n += 1
            seen_end = False
    return n
