"""Validation rules: one class per rule kind of schemas.validation (pure logic, no Ray).

A rule looks at one `Candidate` (an output with what produced it) and returns a `RuleResult`:

    Candidate(output="Order 4411 ships on 2024-03-05.", prompt="...", context=["Order 4411 ..."], ...)
        -> RuleResult(rule="grounding", passed=True, score=1.0, message="2/2 claims found in the context")

Rules that have a deterministic repair also implement `fix(candidate) -> str` (the repaired output).
`check_batch` lets a rule see a whole batch at once (the embedding rule uses it); the default
loops over `check`. A custom rule (spec `rule: custom`) has the same interface: a function
`check(candidate, **options)` returning a RuleResult, a bool or (passed, score, message), or a
class built with **options whose instances have `check` (and `fix`, if the spec uses on_fail: fix).

Messages say what failed and never quote the output or the input: they land in result and
dead-letter rows, which must not carry sensitive values outside the encrypted columns.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import json
import math
import operator
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from crypto import pii
from schemas.errors import SpecError
from schemas.trusted_code import check_import
from schemas.validation import (
    CustomRule,
    DenyListRule,
    GroundingRule,
    JsonSchemaRule,
    LengthRule,
    PiiLeakageRule,
    RefusalRule,
    RegexRule,
)


@dataclass
class Candidate:
    """One generated output and what it was generated from."""

    output: str
    prompt: str = ""  # the prompt of the first attempt (what the input said)
    context: list[str] = field(default_factory=list)  # context documents, when prompt.context_field is set
    completion_tokens: int = 0
    finish_reason: str | None = None
    parsed: Any = None  # the parsed object, once the json_schema rule has passed
    output_json: str | None = None  # ... and its canonical JSON text


@dataclass
class RuleResult:
    rule: str
    passed: bool
    score: float | None = None
    message: str = ""


class Rule:
    """Base of the built-in rules; `spec` is the rule's schemas.validation config."""

    def __init__(self, spec):
        self.spec = spec
        self.name = spec.label

    def check(self, c: Candidate) -> RuleResult:
        raise NotImplementedError

    def check_batch(self, cands: Sequence[Candidate]) -> list[RuleResult]:
        return [self.check(c) for c in cands]

    def fix(self, c: Candidate) -> str:
        raise NotImplementedError(f"rule {self.name} has no fix")

    def _ok(self, message: str = "", score: float | None = None) -> RuleResult:
        if not message and score is None:  # the common result: one shared object per rule (never changed:
            passed = self.__dict__.get("_passed")  # only failed results get a note from a fix)
            if passed is None:
                passed = self._passed = RuleResult(self.name, True, None, "")
            return passed
        return RuleResult(self.name, True, score, message)

    def _fail(self, message: str, score: float | None = None) -> RuleResult:
        return RuleResult(self.name, False, score, message)


# -- length ----------------------------------------------------------------------------------------


class Length(Rule):
    spec: LengthRule

    def check(self, c: Candidate) -> RuleResult:
        s, n, t = self.spec, len(c.output), c.completion_tokens
        problems = []
        if s.max_chars is not None and n > s.max_chars:
            problems.append(f"{n} characters > max_chars {s.max_chars}")
        if s.min_chars is not None and n < s.min_chars:
            problems.append(f"{n} characters < min_chars {s.min_chars}")
        if s.max_tokens is not None and t > s.max_tokens:
            problems.append(f"{t} tokens > max_tokens {s.max_tokens}")
        if s.min_tokens is not None and t < s.min_tokens:
            problems.append(f"{t} tokens < min_tokens {s.min_tokens}")
        return self._fail("; ".join(problems)) if problems else self._ok()

    def fix(self, c: Candidate) -> str:
        return c.output[: self.spec.max_chars]


# -- patterns --------------------------------------------------------------------------------------


class Regex(Rule):
    """The spec's patterns run on the `regex` engine, with `timeout_ms` per pattern and output: a
    pattern that backtracks catastrophically (`(a|aa)+$` on a long run of a's: exponential in
    Python's `re`) would otherwise hold its stage worker, and every batch behind it, for hours.
    A search that runs out of time fails the rule (whether it matched cannot be told); a fix that
    does raises TimeoutError, and the validator rejects the row."""

    spec: RegexRule

    def __init__(self, spec: RegexRule):
        import regex

        super().__init__(spec)
        flags = regex.IGNORECASE if spec.ignore_case else 0
        self.timeout_s = spec.timeout_ms / 1000
        self.must = [(p, regex.compile(p, flags)) for p in spec.must_match]
        self.must_not = [(p, regex.compile(p, flags)) for p in spec.must_not_match]

    def _search(self, rx, text: str) -> bool | None:
        """Whether rx is found in text; None when it ran out of time."""
        try:
            return rx.search(text, timeout=self.timeout_s) is not None
        except TimeoutError:
            return None

    def check(self, c: Candidate) -> RuleResult:
        problems = []
        for p, rx, wanted in [(p, rx, True) for p, rx in self.must] + [(p, rx, False) for p, rx in self.must_not]:
            found = self._search(rx, c.output)
            if found is None:
                problems.append(f"pattern {p!r} did not finish within {self.spec.timeout_ms:g} ms")
            elif found != wanted:
                problems.append(f"does not match {p!r}" if wanted else f"matches {p!r}")
        return self._fail("; ".join(problems)) if problems else self._ok()

    def fix(self, c: Candidate) -> str:
        out = c.output
        for _, rx in self.must_not:
            out = rx.sub(self.spec.replacement, out, timeout=self.timeout_s)
        return out


class DenyList(Rule):
    spec: DenyListRule

    def __init__(self, spec: DenyListRule):
        super().__init__(spec)
        # One alternation, longest phrase first, whole words (\b only where the phrase has a word edge).
        # Each phrase is a named group: a match is reported as the spec's phrase, never as the
        # output's text (IGNORECASE matches look-alikes, e.g. dotless i, that casefold does not map).
        parts = []
        self.phrase_of: dict[str, str] = {}
        for i, phrase in enumerate(sorted(spec.phrases, key=len, reverse=True)):
            body = r"\s+".join(re.escape(w) for w in phrase.split())
            left = r"\b" if phrase[:1].isalnum() else ""
            right = r"\b" if phrase[-1:].isalnum() else ""
            parts.append(f"(?P<p{i}>{left}{body}{right})")
            self.phrase_of[f"p{i}"] = phrase
        self.rx = re.compile("|".join(parts), re.IGNORECASE)
        # The same phrases folded (_fold) for a text that is not ASCII, matched against its folded
        # form: a zero-width space or soft hyphen inside a phrase, full-width letters, "Straße"
        # for "strasse" (before stop 44 each of these passed the rule).
        folded = []
        for name, phrase in self.phrase_of.items():
            f = _fold(phrase)[0]
            if f.strip():
                body = r"\s+".join(re.escape(w) for w in f.split())
                left = r"\b" if f[:1].isalnum() else ""
                right = r"\b" if f[-1:].isalnum() else ""
                folded.append(f"(?P<{name}>{left}{body}{right})")
        self.rx_folded = re.compile("|".join(folded), re.IGNORECASE)

    def _matches(self, text: str) -> list[tuple[str, int, int]]:
        """(group name, start, end) of each denied phrase in `text`, as offsets into `text`: as
        written (a zero-width space standing for a word's edge) and folded (one inside a word,
        "Straße" for "strasse"), whichever finds it."""
        out = [(m.lastgroup, m.start(), m.end()) for m in self.rx.finditer(text)]
        if text.isascii():  # folding ASCII only lower-cases: the folded phrases match it as it is
            out += [(m.lastgroup, m.start(), m.end()) for m in self.rx_folded.finditer(text)]
        else:
            folded, where = _fold(text)
            out += [(m.lastgroup, where[m.start()], where[m.end() - 1] + 1) for m in self.rx_folded.finditer(folded)
                    if m.end() > m.start()]  # fmt: skip
        return sorted(out, key=lambda m: (m[1], -m[2]))

    def check(self, c: Candidate) -> RuleResult:
        hits = {self.phrase_of[name] for name, _, _ in self._matches(c.output)}
        if hits:
            return self._fail("contains denied phrase(s): " + ", ".join(repr(h) for h in sorted(hits)))
        return self._ok()

    def fix(self, c: Candidate) -> str:
        text = c.output
        out, pos = [], 0
        for _, start, end in self._matches(text):  # by start, the longest first: overlaps merge
            if start >= pos:
                out += [text[pos:start], self.spec.replacement]
                pos = end
            elif end > pos:
                pos = end
        return "".join(out) + text[pos:]


def _fold(text: str) -> tuple[str, list[int]]:
    """`text` as the word rules compare it: NFKC (full-width letters and digits, ligatures, a
    no-break space as a space), format characters dropped (zero-width spaces and joiners, soft
    hyphens), casefolded ("ß" is "ss"); with the index in `text` of each character of the result."""
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if ch.isascii():
            out.append(ch.lower())
            where.append(i)
            continue
        if unicodedata.category(ch) == "Cf":
            continue
        for f in unicodedata.normalize("NFKC", ch).casefold():
            out.append(f)
            where.append(i)
    return "".join(out), where


# -- refusals and non-answers ----------------------------------------------------------------------

REFUSAL_OPENERS = (
    "i cannot", "i can't", "i can not", "i can’t", "i'm sorry", "i’m sorry", "i am sorry", "sorry, but",
    "sorry, i", "as an ai", "as a language model", "i'm unable", "i’m unable", "i am unable", "i'm not able",
    "i am not able", "i won't be able", "i will not be able", "i do not have access", "i don't have access",
    "i’m not able", "unfortunately, i can", "i must decline", "i'm afraid i can", "i am afraid i can",
)  # fmt: skip
_CHAR_LOOP = re.compile(r"(\S)\1{29,}")  # 30 of the same character: "!!!!!!!!..."
# What opens a line without saying anything: quotes, a quote marker, a heading, a list bullet.
_OPENING_MARKS = "\"'*_ >#-•“”‘’«»\t\n"


class Refusal(Rule):
    spec: RefusalRule

    def __init__(self, spec: RefusalRule):
        super().__init__(spec)
        phrases = spec.phrases if spec.phrases is not None else REFUSAL_OPENERS
        # Folded and stripped as an output's head is (check): "sorry…", a full-width opener, "- n/a".
        self.openers = tuple(_fold(p)[0].lstrip(_OPENING_MARKS) for p in [*phrases, *spec.extra_phrases])
        self.openers = tuple(p for p in self.openers if p)

    def check(self, c: Candidate) -> RuleResult:
        text = c.output.strip()
        if len(text) < self.spec.min_chars:
            return self._fail("empty answer" if not text else f"non-answer: {len(text)} non-blank character(s)")
        # Folded (_fold: zero-width characters, full-width letters, no-break spaces), and past what
        # opens a line without saying anything: quotes, a quote marker, a heading, a list bullet.
        head = text[:160]
        head = (head.lower() if head.isascii() else _fold(head)[0]).lstrip(_OPENING_MARKS)
        if head.startswith(self.openers):  # one call for all of them; which one only on a hit
            p = next(p for p in self.openers if head.startswith(p))
            return self._fail(f"starts like a refusal ({p!r})")
        words = text.split()
        loop = repeated_ngram(words, self.spec.max_repeats)
        if loop:
            return self._fail(loop)
        # 30 equal characters sit inside one word of at least 30 characters: only those are scanned.
        if max(map(len, words), default=0) >= 30 and any(len(w) >= 30 and _CHAR_LOOP.search(w) for w in words):
            return self._fail("one character repeats 30 or more times in a row")
        return self._ok()


def repeated_ngram(words: list[str], max_repeats: int, max_n: int = 4) -> str | None:
    """A message when some word n-gram (n <= max_n) occurs max_repeats times in a row."""
    # A repeated n-gram has a word equal to the one n places back: most texts have none at all
    # within 4 places, which map(eq) finds in C before any Python loop runs.
    if not any(any(map(operator.eq, words, words[n:])) for n in range(1, max_n + 1)):
        return None
    for n in range(1, max_n + 1):
        need = (max_repeats - 1) * n  # positions equal to the one n words back
        if len(words) < need + n:
            break
        run = 0
        for i in range(n, len(words)):
            if words[i] == words[i - n]:
                run += 1
                if run >= need:
                    return f"a {n}-word sequence repeats {max_repeats} or more times in a row"
            else:
                run = 0
    return None


# -- PII leakage -----------------------------------------------------------------------------------


class PiiLeakage(Rule):
    spec: PiiLeakageRule

    def __init__(self, spec: PiiLeakageRule):
        super().__init__(spec)
        self.kinds = frozenset(spec.kinds)

    def leaked(self, c: Candidate) -> list[pii.PiiSpan]:
        spans = pii.find_pii(c.output, self.kinds)
        if not spans:
            return []
        source = pii.normalise(c.prompt + " " + " ".join(c.context))
        return [s for s in spans if pii.normalise(c.output[s.start : s.end]) not in source]

    def check(self, c: Candidate) -> RuleResult:
        leaked = self.leaked(c)
        if not leaked:
            return self._ok()
        counts: dict[str, int] = {}
        for s in leaked:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        return self._fail("PII not in the input: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))

    def fix(self, c: Candidate) -> str:
        return pii.redact(c.output, self.leaked(c))


# -- grounding -------------------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate(
    "january february march april may june july august september october november december".split())}  # fmt: skip
_MONTH_RX = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_DATE_RX = (
    rf"\b(?:(?P<iy>\d{{4}})-(?P<im>\d{{1,2}})-(?P<id>\d{{1,2}})"
    rf"|(?P<sd>\d{{1,2}})/(?P<sm>\d{{1,2}})/(?P<sy>\d{{4}})"
    rf"|(?i:(?P<am>{_MONTH_RX}))\.?\s+(?P<ad>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<ay>\d{{4}})"
    rf"|(?P<bd>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?i:(?P<bm>{_MONTH_RX}))\.?,?\s+(?P<by>\d{{4}}))\b"
)
_NUMBER_RX = r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*%?"
_DATE = re.compile(_DATE_RX)
_NUMBER = re.compile(_NUMBER_RX)
# One pass over the output finds every claim; earlier alternatives win, so a number inside a
# date, a citation or a quote is not a claim of its own.
_CLAIM = re.compile(
    r"(?P<cite>\[(?i:doc):\s*(?P<doc>\d+)\])"
    rf"|(?P<date>{_DATE_RX})"
    r"|(?P<quote>\"(?P<q1>[^\"\n]{3,300})\"|“(?P<q2>[^”\n]{3,300})”)"
    rf"|(?P<number>{_NUMBER_RX})"
    # One way only to split a run of whitespace (`\s+` then an optional particle and `\s+`):
    # `\s+(?:of|...)?\s*` split it in O(k²) ways, 13 s for a name and 40,000 newlines (stop 44).
    r"|(?P<entity>\b[A-Z][\w'’&-]*(?:\s+(?:(?:of|de|du|van|von|der|la|&)\s+)?[A-Z][\w'’&-]*)*)"
)
# Capitalised words that start sentences without naming anything.
_STOP = frozenset(
    """a an the this that these those it its he she they we i you my our your their his her there here
    what when where which who why how if in on at by for from to of and or but so yes no not also then
    however therefore thus hence according based please note as after before during while with without
    each every all some any many most more less first second third finally overall summary answer
    because since although though yet still today tomorrow yesterday is are was were be do does did can
    could should would will may might must has have had""".split()
)


def _at_sentence_start(text: str, pos: int) -> bool:
    j = pos - 1
    while j >= 0 and text[j].isspace():
        if text[j] == "\n":
            return True
        j -= 1
    return j < 0 or text[j] in ".!?:;"


def _date_key(m: re.Match) -> tuple[int, int, int] | None:
    g = m.groupdict()
    try:
        if g["iy"]:
            return int(g["iy"]), int(g["im"]), int(g["id"])
        if g["sy"]:
            return int(g["sy"]), int(g["sm"]), int(g["sd"])  # d/m/y; m/d/y is matched textually
        if g["ay"]:
            return int(g["ay"]), _month(g["am"]), int(g["ad"])
        return int(g["by"]), _month(g["bm"]), int(g["bd"])
    except (TypeError, ValueError):
        return None


def _month(name: str) -> int:
    name = name.casefold()
    return next(i for m, i in _MONTHS.items() if m.startswith(name[:3]))


def _squash(s: str) -> str:
    return " ".join(s.split()).casefold()


def _has_phrase(text: str, phrase: str) -> bool:
    """`phrase` in `text` as whole words or numbers: not inside a longer one. Before stop 44 a
    claim was a substring: 45 was "found" in 1450, 99 in 3,999, Max in Maximilian."""
    start = 0
    while phrase and (i := text.find(phrase, start)) >= 0:
        j = i + len(phrase)
        if (i == 0 or not _wordish(text[i - 1]) or not _wordish(phrase[0])) and (
            j == len(text) or not _wordish(text[j]) or not _wordish(phrase[-1])
        ):
            return True
        start = i + 1
    return False


def _wordish(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass
class _Context:
    text: str  # squashed
    numbers: set[str]
    dates: set[tuple[int, int, int]]


class Grounding(Rule):
    spec: GroundingRule

    def __init__(self, spec: GroundingRule):
        super().__init__(spec)
        self.checks = frozenset(spec.check)
        self._cache: tuple[tuple[str, ...], _Context] | None = None

    def _context(self, docs: list[str]) -> _Context:
        key = tuple(docs)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        joined = "\n".join(docs)
        numbers = {_plain_number(m.group()) for m in _NUMBER.finditer(joined)}
        dates = {k for m in _DATE.finditer(joined) if (k := _date_key(m))}
        ctx = _Context(_squash(joined), numbers, dates)
        self._cache = (key, ctx)
        return ctx

    def claims(self, c: Candidate) -> tuple[list[tuple[str, bool]], set[str]]:
        """(kind, found) per claim in the output, and the citations naming no document (as the
        output wrote them: counted in the message, never quoted, as they are the model's digits)."""
        ctx = self._context(c.context)
        text = c.output
        checks = self.checks
        claims: list[tuple[str, bool]] = []
        bad_citations: set[str] = set()
        for m in _CLAIM.finditer(text):
            kind = m.lastgroup
            if kind == "cite":
                digits = m.group("doc").lstrip("0")
                # Length first: int() of thousands of digits raises (Python's int_max_str_digits).
                if "citations" in checks and not (0 < len(digits) <= 6 and int(digits) <= len(c.context)):
                    bad_citations.add(digits)
            elif kind == "date":
                if "dates" in checks:
                    claims.append(("date", _date_key(m) in ctx.dates or _has_phrase(ctx.text, _squash(m.group()))))
            elif kind == "quote":
                if "quotes" in checks:
                    claims.append(("quote", _has_phrase(ctx.text, _squash(m.group("q1") or m.group("q2")))))
            elif kind == "number":
                raw = m.group()
                plain = _plain_number(raw)
                if "numbers" in checks and len(plain.lstrip("+-")) >= 2:  # single digits: list numbering, "1 of 2"
                    claims.append(("number", plain in ctx.numbers or _has_phrase(ctx.text, raw.casefold())))
            elif "entities" in checks:
                name = m.group()
                words = name.split()
                if len(words) == 1 and (name.casefold() in _STOP or len(name) < 2):
                    continue
                if _at_sentence_start(text, m.start()):
                    # A sentence start capitalises any word: "Shipping is late" names nothing.
                    # Keep multi-word names, less a leading function word ("The Acme board" -> "Acme").
                    if words[0].casefold() in _STOP:
                        words = words[1:]
                    elif len(words) == 1:
                        continue
                    if not words:
                        continue
                    name = " ".join(words)
                claims.append(("entity", _has_phrase(ctx.text, _squash(name))))
        return claims, bad_citations

    def check(self, c: Candidate) -> RuleResult:
        claims, bad = self.claims(c)
        found = sum(1 for _, ok in claims if ok)
        score = found / len(claims) if claims else 1.0
        problems = []
        if bad:
            problems.append(f"cites {len(bad)} missing document(s) ({len(c.context)} given)")
        if score < self.spec.threshold:
            missing: dict[str, int] = {}
            for kind, ok in claims:
                if not ok:
                    missing[kind] = missing.get(kind, 0) + 1
            problems.append(
                f"{found}/{len(claims)} claims found in the context ({score:.2f} < {self.spec.threshold:.2f}); not found: "
                + ", ".join(f"{n} {_PLURAL[k] if n > 1 else k}" for k, n in sorted(missing.items()))
            )
        if problems:
            return self._fail("; ".join(problems), score)
        return self._ok(f"{found}/{len(claims)} claims found in the context", score)


_PLURAL = {"date": "dates", "quote": "quotes", "number": "numbers", "entity": "entities"}


def _plain_number(s: str) -> str:
    s = s.rstrip("%").lstrip("+")
    if "," in s and "." not in s and re.fullmatch(r"-?\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")  # 1,299 -> 1299
    elif "," in s and "." in s:
        s = s.replace(",", "")  # 1,299.50 -> 1299.50
    return s


# -- structured output -----------------------------------------------------------------------------


class OutputSchema:
    """The job's output schema: a pydantic model (by import path) or an inline JSON Schema.

    parse(text) -> (canonical JSON string, parsed object) or raises ValueError with what failed
    (field paths and constraints, never the offending values).
    """

    def __init__(self, schema: str | dict, allowed_modules: list[str] | None = None):
        self.source = schema
        self.model = None
        if isinstance(schema, str):
            self.model = import_path(schema, "output.schema", allowed_modules)
            if not (isinstance(self.model, type) and hasattr(self.model, "model_validate_json")):
                raise SpecError(f"output.schema: {schema} is not a pydantic model class")
            self.json_schema = self.model.model_json_schema()
        else:
            self.json_schema = schema
            self._validator = json_schema_validator(schema, "output.schema")
        self._names = _schema_names(self.json_schema)

    def path(self, parts) -> str:
        return schema_path(parts, self._names)

    def parse(self, text: str) -> tuple[str, Any]:
        """(output_json, parsed) for an output that is JSON matching the schema; ValueError (the
        rule's failure message, no value quoted) for one that is not."""
        try:
            return self._parse(text)
        except RecursionError:  # a degenerate output ("[[[[..."): json.loads or the check ran out of stack
            raise ValueError("not valid JSON: nested too deeply") from None

    def _parse(self, text: str) -> tuple[str, Any]:
        try:
            # strict=False: some grammar backends emit raw control characters inside strings.
            # NaN / Infinity / 1e999 and repeated keys are not JSON (RFC 8259): before stop 44 they
            # passed (NaN fails no `minimum`), and output_json then held what no JSON reader takes.
            obj = json.loads(text, strict=False, parse_constant=_not_json_constant, parse_float=_finite_float,
                             object_pairs_hook=_unique_keys)  # fmt: skip
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e.msg} at character {e.pos}") from None
        canonical = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        try:
            data = canonical.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud83d"): before stop 44 it stopped the job
            raise ValueError("not valid JSON: a string holds a lone surrogate escape, which is not text") from None
        if self.model is not None:
            from pydantic import ValidationError

            try:
                # From JSON text, as pydantic reads JSON: a strict model takes "2026-01-01" for a
                # date, an enum's value, a list for a tuple (model_validate, Python mode, refused
                # every output of a strict model before stop 44).
                parsed = self.model.model_validate_json(data)
                return parsed.model_dump_json(), parsed
            except ValidationError as e:
                # A message may quote the value (a validator's own, a parser's words, a union's tag):
                # pydantic's words only where they say what the schema expects, else the error type.
                kept = _schema_only_messages()
                msgs = [f"{self.path(err['loc'])}: {err['msg'] if err['type'] in kept else err['type']}"
                        for err in e.errors(include_input=False, include_context=False)]  # fmt: skip
                raise ValueError("does not match the schema: " + "; ".join(msgs[:5])) from None
            except (RecursionError, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - the model's own code (a validator that reads a key the
                # output lacks, a serializer that fails): this output fails the rule, the job goes on
                raise ValueError(f"does not match the schema: the schema's model raised {type(e).__name__}") from None
        errors = schema_errors(self._validator, obj)
        if errors:
            msgs = [f"{self.path(e.path)}: fails {e.validator!r} {_short(e.validator_value)}" for e in errors[:5]]
            raise ValueError("does not match the schema: " + "; ".join(msgs))
        return canonical, obj


def _not_json_constant(name: str):
    raise ValueError(f"not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not valid JSON: a number too large for a double")
    return value


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("not valid JSON: an object repeats a key")
    return out


# Placeholders of pydantic's message templates filled from the input: a parser's own words about it
# ("Input should be a valid UUID, invalid character: expected ... found `j` at 1"), its tag.
_INPUT_PLACEHOLDERS = {"error", "tag", "encoding_error"}


@functools.cache
def _schema_only_messages() -> frozenset[str]:
    """pydantic's built-in error types whose message says only what the schema expects (from its
    template: "String should have at most {max_length} characters"). Not in it, so given by type
    name alone: a model's own validators' (value_error, assertion_error, a PydanticCustomError's
    type), those with an input placeholder, and any type whose template cannot be read here."""
    import typing

    from pydantic_core import PydanticKnownError, core_schema

    context = {"max_length": 1, "min_length": 1, "max_digits": 1, "decimal_places": 1, "whole_digits": 1,
               "expected_version": 1, "actual_length": 1}  # fmt: skip
    kept = set()
    for error_type in typing.get_args(core_schema.ErrorType):
        template = None
        for ctx in (None, {**dict.fromkeys(_CONTEXT_NAMES, "x"), **context}):
            try:
                template = PydanticKnownError(error_type, ctx).message_template
                break
            except (KeyError, TypeError, ValueError):
                continue
        if template is not None and not set(re.findall(r"\{(\w+)\}", template)) & _INPUT_PLACEHOLDERS:
            kept.add(error_type)
    return frozenset(kept - {"value_error", "assertion_error"})


# names pydantic's templates take from their context (what the schema says), to read the templates
_CONTEXT_NAMES = ("attribute", "method_name", "class", "expected_schemes", "expected", "class_name", "discriminator",
                  "expected_tags", "pattern", "ge", "gt", "le", "lt", "field_type", "multiple_of", "timezone",
                  "expected_length", "error", "tag", "context", "reason")  # fmt: skip


# A schema's `pattern` and `patternProperties` run on the `regex` library with this limit per
# search: Python's re cannot be stopped, so a pattern that backtracks catastrophically (an email
# pattern with nested quantifiers, say) on an event's long string held the stage worker, and every
# batch behind it, for good. A search that runs out of time is a violation of that keyword.
SCHEMA_PATTERN_TIMEOUT_S = 0.1
# ... and all of one document's searches together stop after this: an event of thousands of
# strings, each running out of time, would otherwise hold the stage worker for minutes.
SCHEMA_PATTERN_BUDGET_S = 0.5
# What is charged to the budget is a search's own CPU time (time.thread_time) past this allowance:
# wall time charged the time a busy machine kept the worker off its core (stop 44's CI: an event of
# 50,000 valid tags ran out after 23,764 of them, about 21 us each). A short valid search takes
# about 2 us of CPU (p99 3.3 us, measured), so a valid event is charged next to nothing whatever
# its size or the load; a hostile one gets at most the budget plus this allowance per string
# (about 0.5 s more for a 1 MiB event of 11-byte strings). 50 us (the first cut) allowed ~5 s.
SCHEMA_PATTERN_FREE_S = 5e-6
# [seconds of searching left] for the document being validated (schema_errors): only the searches'
# own time is charged, so a large valid document is never cut short by the rest of the validation.
_PATTERN_BUDGET: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("schema_pattern_budget",
                                                                                     default=None)  # fmt: skip


def schema_errors(validator, instance: Any) -> list:
    """Every error of `instance` against a json_schema_validator(), sorted by path; its pattern
    searches share one SCHEMA_PATTERN_BUDGET_S of search CPU time (past it, a search is a violation at once)."""
    token = _PATTERN_BUDGET.set([SCHEMA_PATTERN_BUDGET_S])
    try:
        return sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    finally:
        _PATTERN_BUDGET.reset(token)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str):
    """A schema's pattern, compiled once (regex's own cache lookup was a third of a search's cost:
    bench/schema_patterns.py)."""
    import regex

    return regex.compile(pattern)


def _timed_search(pattern: str, text: str) -> bool | None:
    """Whether `pattern` matches somewhere in `text`; None if the search ran out of time."""
    timeout = SCHEMA_PATTERN_TIMEOUT_S
    budget = _PATTERN_BUDGET.get()
    if budget is not None:
        if budget[0] <= 0:
            return None
        timeout = min(timeout, budget[0])
    t0 = time.thread_time()
    try:
        return _compiled(pattern).search(text, timeout=timeout) is not None
    except TimeoutError:
        return None
    finally:
        if budget is not None:
            budget[0] -= max(0.0, time.thread_time() - t0 - SCHEMA_PATTERN_FREE_S)


def _pattern_keyword(validator, pattern, instance, schema):
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string"):
        found = _timed_search(pattern, instance)
        if not found:  # (messages are not shown: violations name the keyword and the path)
            yield ValidationError("pattern search ran out of time" if found is None else "does not match the pattern")


def _pattern_properties_keyword(validator, patterns, instance, schema):
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for k, v in instance.items():
            found = _timed_search(pattern, k)
            if found is None:
                yield ValidationError("pattern search ran out of time", path=[k])
            elif found:
                yield from validator.descend(v, subschema, path=k, schema_path=pattern)


def _additional_properties_keyword(validator, additional, instance, schema):
    """jsonschema's own, with the patternProperties searches timed (they decide what is extra)."""
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    properties, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
    extras = []
    for k in instance:
        if k in properties:
            continue
        found = [_timed_search(p, k) for p in patterns]
        if None in found:
            yield ValidationError("pattern search ran out of time", path=[k])
        elif not any(found):
            extras.append(k)
    if validator.is_type(additional, "object"):
        for k in extras:
            yield from validator.descend(instance[k], additional, path=k)
    elif not additional and extras:
        yield ValidationError(f"{len(extras)} additional properties are not allowed")


@functools.cache
def _validator_class():
    import jsonschema

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {
        "pattern": _pattern_keyword, "patternProperties": _pattern_properties_keyword,
        "additionalProperties": _additional_properties_keyword,
    })  # fmt: skip


def json_schema_validator(schema: dict[str, Any], field_name: str):
    """A draft 2020-12 validator for `schema`, or SpecError naming the spec field that gave it.
    `format` is checked (email, date, ipv4, ipv6, uuid, regex, ...: jsonschema's checkers for
    the packages installed), and patterns are searched with a time limit (SCHEMA_PATTERN_TIMEOUT_S)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SpecError(f"{field_name}: not a valid JSON Schema: {e.message}") from None
    return _validator_class()(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def schema_path(parts, names: set[str]) -> str:
    """A failing field's path: field names the schema declares, [i] for positions, <key> for a
    key the data made up (it is data, not a field name, so it is not shown)."""
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
        else:
            out.append(("." if out else "") + (p if p in names else "<key>"))
    return "".join(out) or "(root)"


def _schema_names(schema: Any) -> set[str]:
    """Every property name a JSON Schema declares, at any depth ($defs included)."""
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                names.update(k for k in props if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


class JsonSchema(Rule):
    spec: JsonSchemaRule

    def __init__(self, spec: JsonSchemaRule, schema: OutputSchema):
        super().__init__(spec)
        self.schema = schema

    def check(self, c: Candidate) -> RuleResult:
        try:
            c.output_json, c.parsed = self.schema.parse(c.output)
        except ValueError as e:
            return self._fail(str(e))
        return self._ok()


# -- custom rules ----------------------------------------------------------------------------------

CUSTOM_MESSAGE_CHARS = 200


def _is_bool(value: Any) -> bool:
    """A bool, or numpy's (what `score > 0.8` gives on a numpy score), without importing numpy."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool", "bool_") and type(value).__module__ == "numpy")


def _scrubbed(message: str) -> str:
    """A custom rule's message as stored: PII in it redacted, at most CUSTOM_MESSAGE_CHARS long
    (a rule may quote the output it judged; the message lands in plain-text columns)."""
    text = str(message)
    spans = pii.find_pii(text)
    if spans:
        text = pii.redact(text, spans)
    return text if len(text) <= CUSTOM_MESSAGE_CHARS else text[: CUSTOM_MESSAGE_CHARS - 3] + "..."


def import_path(path: str, field_name: str, allowed_modules: list[str] | None = None) -> Any:
    """The object `module:attr` names, once the trust policy allows importing it (schemas/trusted_code.py)."""
    check_import(field_name, path, allowed_modules)
    module, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is a spec error naming the path
        raise SpecError(f"{field_name}: cannot import module {module!r}: {type(e).__name__}: {e}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise SpecError(f"{field_name}: module {module!r} has no attribute {attr!r}") from None


class Custom(Rule):
    spec: CustomRule

    def __init__(self, spec: CustomRule, field_name: str, allowed_modules: list[str] | None = None):
        super().__init__(spec)
        target = import_path(spec.path, field_name + ".path", allowed_modules)
        self._fix: Callable[[Candidate], str] | None = None
        if isinstance(target, type):
            try:
                obj = target(**spec.options)
            except TypeError as e:
                raise SpecError(f"{field_name}.options: {spec.path}: {e}") from None
            if not callable(getattr(obj, "check", None)):
                raise SpecError(f"{field_name}.path: {spec.path} has no check(candidate) method")
            self._check = obj.check
            self._fix = getattr(obj, "fix", None)
        elif callable(target):
            options = spec.options
            self._check = lambda c: target(c, **options)
        else:
            raise SpecError(f"{field_name}.path: {spec.path} is neither a function nor a class")
        uses_fix = spec.on_fail == "fix" or (spec.on_fail == "retry" and spec.then == "fix")
        if uses_fix and self._fix is None:
            raise SpecError(f"{field_name}: on_fail fix needs a rule class with a fix(candidate) method")

    def check(self, c: Candidate) -> RuleResult:
        try:
            out = self._check(c)
        except Exception as e:  # noqa: BLE001 - a row the rule cannot judge fails it; the job goes on
            # By type only: the message may quote the output. A rule that raises on every row
            # fails every row (its rule_results say so), which the failure counters show at once.
            return self._fail(f"custom rule raised {type(e).__name__}")
        try:
            if isinstance(out, RuleResult):
                return RuleResult(self.name, bool(out.passed), None if out.score is None else float(out.score),
                                  _scrubbed(out.message or ""))  # fmt: skip
            if _is_bool(out):
                return self._ok() if out else self._fail("custom rule failed")
            if isinstance(out, tuple) and out and _is_bool(out[0]):
                passed, score, message = (*out, None, "")[:3]
                return RuleResult(self.name, bool(passed), None if score is None else float(score),
                                  _scrubbed(message or ""))  # fmt: skip
        except (TypeError, ValueError):  # a score that is no number, say
            pass
        # A row the rule cannot judge fails it (a branch that forgot its return gives None); the job goes on.
        return self._fail(f"custom rule returned {type(out).__name__}, not a RuleResult, a bool or (passed, score, message)")

    def fix(self, c: Candidate) -> str:
        return self._fix(c)  # type: ignore[misc]
