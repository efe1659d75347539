"""PII detectors shared by the PII-leakage guardrail and field encryption (pure logic).

    find_pii("mail jo@x.io or +44 20 7946 0958")
        -> [PiiSpan(kind="email", start=5, end=12), PiiSpan(kind="phone", start=16, end=32)]

Kinds: email, phone, card (13-19 digits, Luhn-checked), iban (ISO 13616 mod-97 checked),
national_id (US SSN, UK National Insurance number). Spans never overlap: where two detectors
match the same characters the more specific kind wins (card > iban > national_id > phone), so a
card number is not also reported as a phone number.

Patterns favour precision over recall: a guardrail that cries wolf on every order number gets
switched off. Checksums (Luhn, mod-97) remove most false card/IBAN hits; phone numbers need a
leading '+' or a separator-grouped national form and 9-15 digits.

The detectors read a text as it is shown: characters that render as nothing (Unicode's
Default_Ignorable_Code_Point: zero-width spaces and joiners, soft hyphens, variation selectors,
bidi marks) are skipped and compatibility forms read as what they stand for (NFKC: a full-width
'＠' is '@'), so "4111<ZWSP>1111 1111 1111" is a card. Spans are offsets into the text as given,
from the first character of the value to its last, the invisible ones between included.
"""

from __future__ import annotations

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
# 13-19 digits, optionally grouped by single spaces or dashes. Not dots: a dot anywhere would take
# in decimals (3.14159265358979, one in ten of which passes Luhn), and a second pattern for four
# dotted groups of four doubled the cost of every text with 9 digits in a row (measured, stop 46).
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_NINO = re.compile(r"\b(?![DFIQUV])[A-CEGHJ-PR-TW-Z](?![DFIQUVO])[A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# International (+CC ...), or a national number in a form few other numbers take: an area code in
# brackets ((555) 123-4567, (020) 7946 0958); a trunk 0 (020 7946 0958, 0161 496 0000; a UK mobile,
# 07946 095812 or 07946 095 812; the French five pairs with one separator throughout,
# 06 12 34 56 78 or 06.12.34.56.78, as a date and a time, 01.02.2024 10 30, are not); or North
# America's 3-3-4 with one dash or dot throughout (555-123-4567). Not three groups of plain numbers
# split by spaces ("sizes 100 200 300", "250 500 1000": phones before stop 46).
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]\d{3,4}"
    r"|0\d{1,3}[ .-]\d{3,4}[ .-]\d{3,4}"
    r"|0\d{4}[ .-](?:\d{6}|\d{3}[ .-]\d{3})"
    r"|0[1-9]([ .-])\d{2}(?:\1\d{2}){3}"
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


# Unicode's invisible characters, from the library that knows the property (re has no \p{...}).
_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")


def shown(text: str) -> tuple[str, list[int] | None]:
    """`text` as it reads: invisible characters dropped, compatibility forms NFKC-normalised (not
    case-folded: IBANs and NI numbers are upper case); with the index in `text` of each character
    of the result, or None where that is `text` itself (ASCII, and most other text: checked in C)."""
    if text.isascii():
        return text, None
    out: list[str] = []
    where: list[int] = []
    if unicodedata.is_normalized("NFKC", text):  # at most invisible characters to drop: cut around them
        pos = 0
        for m in _IGNORABLE.finditer(text):
            out.append(text[pos : m.start()])
            where += range(pos, m.start())
            pos = m.end()
        if not pos:
            return text, None
        out.append(text[pos:])
        where += range(pos, len(text))
        return "".join(out), where
    for i, ch in enumerate(text):
        if ch.isascii():
            out.append(ch)
            where.append(i)
        elif not _IGNORABLE.match(ch):
            for f in unicodedata.normalize("NFKC", ch):
                out.append(f)
                where.append(i)
    return "".join(out), where


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
        found += [PiiSpan("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
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
