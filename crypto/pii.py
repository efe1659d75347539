"""PII detectors shared by the PII-leakage guardrail and field encryption (pure logic).

    find_pii("mail jo@x.io or +44 20 7946 0958")
        -> [PiiSpan(kind="email", start=5, end=12), PiiSpan(kind="phone", start=16, end=32)]

Kinds: email, phone, card (13-19 digits, Luhn-checked), iban (ISO 13616 mod-97 checked),
national_id (US SSN, UK National Insurance number). Spans never overlap: where two detectors
match the same characters the more specific kind wins (card > iban > national_id > phone), so a
card number is not also reported as a phone number.

Patterns favour precision over recall: a guardrail that cries wolf on every order number gets
switched off. Checksums (Luhn, mod-97) and card groupings remove most false card/IBAN hits; phone
numbers need a leading '+' or a national form few other numbers take (_PHONE), and 9-15 digits.

The detectors read a text as it is shown (`shown`): characters that render as nothing (zero-width
spaces and joiners, soft hyphens, variation selectors, bidi marks) are skipped, compatibility forms
read as what they stand for (NFKC: a full-width '＠' is '@'), and other dashes as '-', so
"4111<ZWSP>1111 1111 1111" and "555‑123‑4567" (U+2011) are found. Spans are offsets into the text
as given, from the first character of the value to its last, the invisible ones between included.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from dataclasses import dataclass

import regex

KINDS = ("email", "phone", "card", "iban", "national_id")


@dataclass(frozen=True)
class PiiSpan:
    kind: str
    start: int
    end: int


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
# Endings of file names that no top-level domain has: "logo@2x.png" (a retina image) is a file, not
# an address (an email before stop 46).
_FILE_SUFFIXES = frozenset("png jpg jpeg gif svg webp bmp tif tiff ico heic pdf css scss html htm json yaml yml "
                           "txt csv tsv js mjs ts tsx jsx ipynb".split())  # fmt: skip
# 13-19 digits, optionally grouped by single spaces or dashes. Not dots: a dot anywhere would take
# in decimals (3.14159265358979, one in ten of which passes Luhn), and a second pattern for four
# dotted groups of four doubled the cost of every text with 9 digits in a row (measured, stop 46).
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_NINO = re.compile(r"\b(?![DFIQUV])[A-CEGHJ-PR-TW-Z](?![DFIQUVO])[A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# International (+CC ...), or a national number in a form few other numbers take: an area code in
# brackets ((555) 123-4567, (020) 7946 0958); a trunk 0 and a non-zero digit (020 7946 0958,
# 0161 496 0000; a UK mobile, 07946 095812 or 07946 095 812; a French mobile, 06 12 34 56 78 or
# 06.12.34.56.78, one separator throughout: a date and a time, 01.02.2024 10 30, are not, and
# neither is a zero-padded id, 00123-456789); or North America's 3-3-4 with one dash or dot
# throughout (555-123-4567). Not three groups of plain numbers split by spaces ("sizes 100 200 300",
# "250 500 1000": phones before stop 46), nor a list of pairs (05 12 23 34 45, a lottery draw).
_PHONE = re.compile(
    r"(?<![\w+/])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]\d{3,4}"
    r"|0[1-9]\d{0,2}[ .-]\d{3,4}[ .-]\d{3,4}"
    r"|07\d{3}[ .-](?:\d{6}|\d{3}[ .-]\d{3})"
    r"|0[67]([ .])\d{2}(?:\1\d{2}){3}"
    r"|[2-9]\d{2}([.-])\d{3}\2\d{4})(?![\w-])(?![ .]\d)"
)

# Gates: cheap scans (each pattern starts with a character class, which the regex engine skips to
# quickly) that every match of the detectors behind them must contain. Most texts fail them all,
# and the exact patterns, whose look-behinds make them scan slowly, never run.
_GATE_DIGITS = re.compile(r"\d(?:[ .()\-]{0,2}\d){8}")  # phones, cards, SSNs: 9+ digits, lightly separated
_GATE_IBAN = re.compile(r"[A-Z]{2}\d{2}")
_GATE_NINO = re.compile(r"[A-Z] ?\d{2} ?\d{2} ?\d{2}")

_ORDER = {"card": 0, "iban": 1, "national_id": 2, "email": 3, "phone": 4}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)  # any decimal digit: full-width ones too (ord - 48 made them noise before stop 44)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdecimal())


_DIGIT_GROUP = re.compile(r"\d+")


def _card_span(text: str, m: re.Match) -> tuple[int, int] | None:
    """The card number in a card-shaped match: all of it, or all but one short group (at most 4
    digits) at either end, whichever passes Luhn and is grouped as cards are written (whole, in
    fours, 4-6-5 or 4-6-4). "4111 1111 1111 1111 12/25" and "4111111111111111 123" hold a card
    followed by an expiry or a code, which the greedy match takes in (its Luhn then fails: missed
    before stop 44). One group at most, at an end only: a long grouped number has few chances to
    pass by accident (precision over recall). Before stop 46 any grouping passed: a list of
    two-digit numbers ("12 34 56 78 90 12 34 56") was a card one time in five."""
    s = m.group()
    groups = [(g.start(), g.end()) for g in _DIGIT_GROUP.finditer(s)]
    lengths = [b - a for a, b in groups]
    if _grouped_like_a_card(lengths) and luhn_ok(_digits(s)):
        return m.start(), m.end()
    if len(groups) < 2:
        return None
    for first, last in ((0, len(groups) - 2), (1, len(groups) - 1)):
        dropped = groups[-1] if first == 0 else groups[0]
        if dropped[1] - dropped[0] > 4 or not _grouped_like_a_card(lengths[first : last + 1]):
            continue
        part = s[groups[first][0] : groups[last][1]]
        if 13 <= len(_digits(part)) <= 19 and luhn_ok(_digits(part)):
            return m.start() + groups[first][0], m.start() + groups[last][1]
    return None


def _grouped_like_a_card(lengths: list[int]) -> bool:
    """Digit group lengths as card numbers are written: one group, fours with a shorter last one
    (4-4-4-4, 4-4-4-4-3; a group of eight is two fours whose space was left out or made invisible:
    "4111<ZWSP>1111 1111 1111" reads as 8-4-4), or American Express's and Diners' 4-6-5 and 4-6-4."""
    if len(lengths) == 1 or lengths in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(n % 4 == 0 for n in lengths[:-1]) and (lengths[-1] <= 4 or lengths[-1] % 4 == 0)


def _iban_span(text: str, m: re.Match) -> tuple[int, int] | None:
    """The IBAN in an IBAN-shaped match: all of it, or it less the space-separated groups the
    greedy match took in after it ("GB82 WEST 1234 5698 7654 32 EUR": missed before stop 44),
    the longest that passes mod-97."""
    s = m.group()
    end = len(s)
    while end > 0:
        if iban_ok(s[:end]):
            return m.start(), m.start() + end
        cut = s.rfind(" ", 0, end)
        if cut < 4:
            return None
        end = cut
    return None


# How a character reads where it reads otherwise than it is written: invisible characters (Unicode's
# Default_Ignorable_Code_Point and format characters, from the `regex` library, which has Unicode's
# properties), as nothing; compatibility forms, as their NFKC form (a full-width '＠' is '@'); dashes
# other than '-' and the minus sign, as '-' (a model writes 555‑123‑4567 with U+2011, which NFKC
# keeps); the braille blank, as a space.
_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}]")
_DASH = regex.compile(r"(?V1)[[\p{Pd}\u2212]--[\-]]")


@functools.lru_cache(maxsize=4096)
def _as_shown(ch: str) -> str:
    return _reads_as(ch)


def _reads_as(ch: str) -> str:
    if _INVISIBLE.match(ch):
        return ""
    if ch == "\u2800":
        return " "
    return _DASH.sub("-", unicodedata.normalize("NFKC", ch))


# What the detectors read: letters, digits, white space, + - . @ % _ (not brackets or slashes: a
# full-width '（' stays as written, so "（555）123-4567" is not a phone).
_READ = regex.compile(r"[A-Za-z\d\s+\-.@%_]")
# Astral blocks that hold characters shown() changes and a detector reads (mathematical and enclosed
# alphanumerics, tags, ...), coarsely: a character of them that reads as written costs one step.
_ASTRAL = ((0x10000, 0x1D7FF), (0x1F100, 0x1F1FF), (0x1FBF0, 0x1FBF9), (0xE0000, 0xE0FFF))


@functools.cache
def _bmp_shown_otherwise() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(every such range, those NFKC leaves as they are) of the Basic Multilingual Plane's code
    points that _shown_otherwise's classes hold: found in one pass over all of them, once per
    process (~0.1 s, on the first text that is not ASCII)."""
    every: list[list[int]] = []
    kept_by_nfkc: list[list[int]] = []
    for c in range(0x10000):
        ch = chr(c)
        if 0xD800 <= c <= 0xDFFF or (shown_as := _reads_as(ch)) == ch or (shown_as and not _READ.search(shown_as)):
            continue
        for ranges in (every, kept_by_nfkc) if unicodedata.normalize("NFKC", ch) == ch else (every,):
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return [tuple(r) for r in every], [tuple(r) for r in kept_by_nfkc]


@functools.cache
def _shown_otherwise(nfkc_normal: bool, astral: bool) -> re.Pattern:
    """One `re` class of the characters shown() changes into something a detector reads (or into
    nothing): each such code point of the Basic Multilingual Plane (_bmp_shown_otherwise), and,
    for a text with characters beyond it, the _ASTRAL blocks (a class with ranges past U+FFFF is
    scanned range by range, about 3 times slower); for an NFKC-normal text (most text: a C-level
    check), only those NFKC leaves as they are (invisible characters, dashes, the braille blank).
    Not Unicode's property classes: the `regex` library scans a text with those about 5 times
    slower than `re` with plain ranges. And a change into nothing a detector reads (the full-width
    punctuation of Chinese and Japanese prose, ，！（）) is not made at all: each was a Python step
    in the review of stop 46's first cut (Chinese prose 8 times slower)."""
    every, kept_by_nfkc = _bmp_shown_otherwise()
    ranges = [*(kept_by_nfkc if nfkc_normal else every), *(_ASTRAL if astral else ())]
    return re.compile("[" + "".join(re.escape(chr(lo)) + ("-" + re.escape(chr(hi)) if hi > lo else "")
                                    for lo, hi in ranges) + "]")  # fmt: skip


class Offsets:
    """Index in a shown text (`shown`) -> index in the text as written. Sparse: one entry per run
    of unchanged text and per changed character, so a megabyte with one change in it holds a few
    numbers, not a million."""

    __slots__ = ("_starts", "_segments")

    def __init__(self, segments: list[tuple[int, int, bool]]):
        """segments: (start in the shown text, start in the text as written, replaced), in order;
        a replaced one maps all its characters to its one written character."""
        self._segments = segments
        self._starts = [shown_start for shown_start, _, _ in segments]  # bisected

    def __getitem__(self, i: int) -> int:
        shown_start, written_start, replaced = self._segments[bisect.bisect_right(self._starts, i) - 1]
        return written_start if replaced else written_start + i - shown_start


def shown(text: str) -> tuple[str, Offsets | None]:
    """`text` as it reads (_as_shown; not case-folded: IBANs and NI numbers are upper case),
    and where each of its characters is in `text` (a character a replacement expanded to several
    all map to it), or None where that is `text` itself. The cost grows with the characters
    changed, not the text's length: before the review of stop 46's first cut, one full-width
    comma sent a whole text through a per-character loop (Chinese prose 29 times slower). Only
    changes a detector can see are made (_shown_otherwise)."""
    if text.isascii():
        return text, None
    out: list[str] = []
    segments: list[tuple[int, int, bool]] = []
    pos = length = 0  # in text, in the result
    # Characters past U+FFFF take two UTF-16 units (a C-level copy, no Python step per character).
    astral = len(text.encode("utf-16-le", "surrogatepass")) > 2 * len(text)
    for m in _shown_otherwise(unicodedata.is_normalized("NFKC", text), astral).finditer(text):
        i = m.start()
        rep = _as_shown(text[i])
        if rep == text[i]:  # an astral character that reads as written
            continue
        if i > pos:
            segments.append((length, pos, False))
            out.append(text[pos:i])
            length += i - pos
        if rep:
            segments.append((length, i, True))
            out.append(rep)
            length += len(rep)
        pos = i + 1
    if not segments and not pos:
        return text, None
    if pos < len(text):
        segments.append((length, pos, False))
        out.append(text[pos:])
    return "".join(out), Offsets(segments)


def find_pii(text: str, kinds: frozenset[str] | None = None) -> list[PiiSpan]:
    """Non-overlapping PII spans in text, ordered by position (offsets into `text` as given)."""
    if not text:
        return []
    seen, where = shown(text)
    spans = _find(seen, kinds)
    if where is None:
        return spans
    return [PiiSpan(s.kind, where[s.start], where[s.end - 1] + 1) for s in spans]


def _find(text: str, kinds: frozenset[str] | None) -> list[PiiSpan]:
    want = kinds or frozenset(KINDS)
    found: list[PiiSpan] = []
    if "email" in want and "@" in text:
        found += [PiiSpan("email", m.start(), m.end()) for m in _EMAIL.finditer(text)
                  if m.group().rpartition(".")[2].lower() not in _FILE_SUFFIXES]  # fmt: skip
    if _GATE_DIGITS.search(text):
        if "card" in want:
            found += [PiiSpan("card", *span) for m in _CARD.finditer(text) if (span := _card_span(text, m))]
        if "national_id" in want:
            found += [PiiSpan("national_id", m.start(), m.end()) for m in _SSN.finditer(text)]
        if "phone" in want:
            found += [
                PiiSpan("phone", m.start(), m.end()) for m in _PHONE.finditer(text) if 9 <= len(_digits(m.group())) <= 15
            ]
    if "iban" in want and _GATE_IBAN.search(text):
        found += [PiiSpan("iban", *span) for m in _IBAN.finditer(text) if (span := _iban_span(text, m))]
    if "national_id" in want and _GATE_NINO.search(text):
        found += [PiiSpan("national_id", m.start(), m.end()) for m in _NINO.finditer(text)]
    if len(found) < 2:
        return found
    found.sort(key=lambda s: (_ORDER[s.kind], s.start))
    kept: list[PiiSpan] = []
    for span in found:
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    kept.sort(key=lambda s: s.start)
    return kept


_NORMALISE = re.compile(r"[\s().\-]+")


def normalise(value: str) -> str:
    """The form two mentions of one PII value share: as shown (no invisible characters, NFKC), no
    spaces, dashes, dots or brackets; casefolded."""
    return _NORMALISE.sub("", shown(value)[0]).casefold()


def redact(text: str, spans: list[PiiSpan]) -> str:
    """Replace each span by [REDACTED:<kind>]."""
    out, pos = [], 0
    for s in spans:
        out.append(text[pos : s.start])
        out.append(f"[REDACTED:{s.kind}]")
        pos = s.end
    out.append(text[pos:])
    return "".join(out)
