"""Validation rules and the validation stage: curated pass and fail cases for every rule (pure logic)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import BaseModel, model_validator

from crypto.pii import find_pii, iban_ok, luhn_ok
from compute.rules import Candidate, OutputSchema, RuleResult
from compute.validation import build_rules
from compute.validation import Validator
from schemas.errors import SpecError
from schemas.records import COMPLETION_SCHEMA, REQUEST_SCHEMA
from schemas.spec import parse_spec
from schemas.validation import (
    DenyListRule,
    GroundingRule,
    LengthRule,
    PiiLeakageRule,
    RefusalRule,
    RegexRule,
)


def rule(spec):
    return build_rules([spec], None)[0]


def check(spec, output: str, **cand) -> RuleResult:
    return rule(spec).check(Candidate(output, **cand))


# -- PII detectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("write to jo.smith+x@example.co.uk today", ["email"]),
        ("call +44 20 7946 0958 or (555) 123-4567", ["phone", "phone"]),
        ("card 4111 1111 1111 1111 and 5500-0000-0000-0004", ["card", "card"]),
        ("IBAN GB82 WEST 1234 5698 7654 32, DE89370400440532013000", ["iban", "iban"]),
        ("SSN 123-45-6789, NINO AB 12 34 56 C", ["national_id", "national_id"]),
        # Near misses: bad checksums, invalid SSN areas, order numbers, dates, versions, prices.
        ("card 4111 1111 1111 1112, IBAN GB82 WEST 1234 5698 7654 33", []),
        ("SSN 000-12-3456 or 666-12-3456; order 12345 on 2024-03-05 costs 1,299.00; v1.2.3", []),
        # Since stop 44: a card followed by its expiry or code, an IBAN followed by a word, full-width
        # digits (missed before: the greedy match took the rest in and its checksum failed) ...
        ("card 4111 1111 1111 1111 12/25", ["card"]),
        ("card 4111111111111111 123 (code)", ["card"]),
        ("pay to GB82 WEST 1234 5698 7654 32 EUR, or DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX", ["iban", "iban"]),
        ("card ４１１１ １１１１ １１１１ １１１１", ["card"]),
        # ... and a long grouped number with no card at an end is still none.
        ("order 1234 5678 9012 3456 78", []),
        # Since stop 46: values as they read, with invisible characters inside (zero-width space,
        # soft hyphen, variation selector) or compatibility forms (full-width '@' and '.') ...
        ("card 4111\u200b1111\u200b1111\u200b1111 or jo\u200b@x.io", ["card", "email"]),
        ("SSN 123\u00ad-45-6789, IBAN GB82\ufe0fWEST 1234 5698 7654 32", ["national_id", "iban"]),
        ("mail jo＠example．com", ["email"]),
        # ... French and UK national numbers ...
        ("tel 06 12 34 56 78, 06.12.34.56.78, 07946 095812 or 07700 900 123", ["phone"] * 4),
        # ... cards as American Express and Diners group them ...
        ("amex 3782 822463 10005, diners 3056 930902 5904", ["card", "card"]),
        # ... and numbers that are not grouped as cards are, even where their digits pass Luhn
        # (before stop 46 a list of two-digit numbers was a card one time in five):
        ("ids 12 34 56 78 90 12 34 56; scores 10 12 14 16 18 20 22 24; from 2024-03-05 2024-03-05", []),
        # ... North American and trunk-0 national forms; not three space-separated plain numbers
        # (before stop 46 each of the second line was a phone) ...
        ("call 555-123-4567, 555.123.4567, (020) 7946 0958 or 0161 496 0000", ["phone"] * 4),
        ("sizes 100 200 300; 250 500 1000 points; totals 1200 3400 5600; order 2024 1234 5678", []),
        # ... dashes a model writes in numbers (U+2011, an en dash, a minus sign), a braille blank ...
        ("ring 555\u2011123\u20114567, SSN 123\u201345\u20136789, 555\u2212123\u22124567", ["phone", "national_id", "phone"]),
        ("card 4111\u28001111 1111 1111", ["card"]),
        # ... and not lists of pairs, zero-padded ids, or pairs after a slash (review of stop 46's first cut):
        ("draw 05 12 23 34 45; 01 02 03 04 05; 03.12.25.33.41; SKU 00123-456789; zip 02139-123456", []),
        ("week 05/06 07 08 09 10; order 01234-567-890; price 01234.567890; hex 08 00 45 00 00", []),
        # ... a retina image's file name is not an email (one before stop 46); a .py address is one ...
        ("use logo@2x.png, icon@3x.jpg and theme@dark.css; mail jo@empresa.com.py", ["email"]),
        # ... and the phones' near misses: a date and a time, mixed separators, pi, five dotted groups.
        ("on 01.02.2024 10 30 (06 12 34.56 78), pi 3.14159265358979, v 1111.1111.1111.1111.1111", []),
    ],
)
def test_pii_detectors(text, kinds):
    assert [s.kind for s in find_pii(text)] == kinds


def test_a_span_hidden_by_invisible_characters_covers_the_value_as_written():
    text = "call +44\u200b20 7946 0958 now, card ４１１１\u2060 1111 1111 1111."
    assert [text[s.start : s.end] for s in find_pii(text)] == ["+44\u200b20 7946 0958", "４１１１\u2060 1111 1111 1111"]
    # pii_leakage: the card in the input is the card in the output, invisible characters or not
    spec = PiiLeakageRule(rule="pii_leakage")
    assert check(spec, "your card 4111\u200b1111 1111 1111", prompt="card 4111-1111-1111-1111").passed
    assert check(spec, "your card 4111 1111 1111 1111", prompt="card 4111\u200b1111\u200b1111\u200b1111").passed
    assert not check(spec, "your card 4111\u200b1111 1111 1111", prompt="no card here").passed


def test_text_as_shown_maps_every_span_back_to_the_text_as_written():
    """find_pii reads a text as shown (crypto.pii.shown: sparse offsets, only changes a detector
    can see) and must find what a plain per-character reading finds, at the same places: random
    texts of digits, separators, invisible characters, full-width forms, ligatures, dashes, '…'."""
    import random

    from crypto import pii

    def reference(text):
        out, where = [], []
        for i, ch in enumerate(text):
            r = pii._reads_as(ch)
            if r != ch and r and not pii._READ.search(r):
                r = ch  # a change no detector sees is not made (shown() does the same)
            out.append(r)
            where += [i] * len(r)
        seen = "".join(out)
        return [(s.kind, where[s.start], where[s.end - 1] + 1) for s in pii._find(seen, None)]

    rng = random.Random(46)
    alphabet = list("0123456789 -.@ab") + ["\u200b", "\u00ad", "\ufe0f", "４", "１", "\u3000", "\u2011", "\u2013",
                                            "ﬁ", "…", "，", "（", "＠", "𝟒", "\U000e0020", "😀", "日"]  # fmt: skip
    found = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        text += rng.choice(["", " 4111\u200b1111 1111 1111", " jo\u00ad@x.io", " +44\u200b20 7946 0958"])
        got = [(s.kind, s.start, s.end) for s in find_pii(text)]
        assert got == reference(text), repr(text)
        found += len(got)
    assert found > 1000  # the texts did hold PII to map back


def test_changes_no_detector_sees_are_not_made_and_offsets_stay_sparse():
    from crypto.pii import shown

    zh = "这是一个（测试）文本，包含标点！" * 100
    assert shown(zh) == (zh, None)  # full-width punctuation: read as written, no per-character work
    big = "a" * 100_000 + "\u2026" + "b" * 100_000
    seen, where = shown(big)
    assert seen == "a" * 100_000 + "..." + "b" * 100_000
    assert len(where._segments) == 3  # not 200,003 offsets
    assert [where[i] for i in (0, 99_999, 100_000, 100_002, 100_003, 200_002)] == [0, 99_999, 100_000, 100_000,
                                                                                    100_001, 200_000]  # fmt: skip


def test_a_card_with_its_expiry_is_redacted_whole_and_the_expiry_kept():
    text = "card 4111 1111 1111 1111 12/25"
    (span,) = find_pii(text)
    assert text[span.start : span.end] == "4111 1111 1111 1111"


@pytest.mark.parametrize("output", ["ki\u200bll switch", "kil\u00adl switch", "ｋｉｌｌ switch", "Kill\u00a0Switch",
                                    "the Straße"])  # fmt: skip
def test_deny_list_sees_through_zero_width_characters_full_width_letters_and_case_folding(output):
    """Before stop 44 each passed `deny_list` (phrases "kill switch", "strasse"): a zero-width
    space or soft hyphen inside the phrase, full-width letters, a no-break space, "ß" (IGNORECASE
    is not casefolding). Its fix removes the phrase from the text as written."""
    spec = DenyListRule(rule="deny_list", phrases=["kill switch", "strasse"], on_fail="fix")
    r = check(spec, output)
    assert not r.passed, output
    fixed = rule(spec).fix(Candidate(output))
    assert "[removed]" in fixed and "switch" not in fixed.casefold() and "stra" not in fixed.casefold(), fixed
    assert check(spec, "skill switchboard on Strasbourg street").passed


@pytest.mark.parametrize("output", ["\u200bI cannot help with that.", "> I cannot help with that.", "“I’m sorry, no.",
                                    "I\u00a0cannot help.", "Ｉ cannot help.", "- I cannot help.", "# I am unable to"])  # fmt: skip
def test_a_refusal_is_seen_behind_quotes_markers_and_look_alike_characters(output):
    assert not check(RefusalRule(rule="refusal"), output).passed, output


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_a_card_number_is_one_card_not_also_a_phone():
    spans = find_pii("pay with 4111-1111-1111-1111 now")
    assert [(s.kind, s.start, s.end) for s in spans] == [("card", 9, 28)]


# -- rules, each with pass and fail cases ----------------------------------------------------------


def test_length_rule():
    spec = LengthRule(rule="length", min_chars=3, max_chars=10, max_tokens=5)
    assert check(spec, "hello", completion_tokens=2).passed
    r = check(spec, "hello world!", completion_tokens=7)
    assert not r.passed and r.message == "12 characters > max_chars 10; 7 tokens > max_tokens 5"
    assert check(spec, "hi").message == "2 characters < min_chars 3"
    fixable = LengthRule(rule="length", max_chars=5, on_fail="fix")
    assert rule(fixable).fix(Candidate("abcdefgh")) == "abcde"


def test_regex_rule():
    spec = RegexRule(rule="regex", must_match=[r"^\w"], must_not_match=[r"(?i)http://\S+"])
    assert check(spec, "Answer: fine").passed
    r = check(spec, " see http://x.io")
    assert not r.passed and "does not match '^\\\\w'" in r.message and "matches '(?i)http://\\\\S+'" in r.message
    fix = RegexRule(rule="regex", must_not_match=[r"http://\S+"], on_fail="fix")
    assert rule(fix).fix(Candidate("see http://x.io now")) == "see [removed] now"


@pytest.mark.timeout(120)  # Python's re needs years for these searches: before, the rule never returned
def test_a_pattern_that_backtracks_catastrophically_fails_its_row_not_the_batch():
    """`(a|aa)+$` on sixty a's and a '!' is exponential for a backtracking engine. The regex rule
    runs on `regex` with timeout_ms per pattern and output: that row fails the rule (flag: kept,
    flagged; fix: its repair runs out of time too, so it is rejected) and the others are judged."""
    slow = "a" * 60 + "!"
    flag = [{"rule": "regex", "must_not_match": [r"(a|aa)+$"], "timeout_ms": 50, "on_fail": "flag"}]
    out = Validator(base_spec(validation=flag)).validate(*batch(["fine answer", slow, "baa"]))
    assert out.action == ["keep", "keep", "keep"] and out.status == ["ok", "flagged", "flagged"]
    messages = [r[0]["message"] for r in out.rule_results.to_pylist()]
    assert messages == ["", "pattern '(a|aa)+$' did not finish within 50 ms", "matches '(a|aa)+$'"]
    fix = [{**flag[0], "on_fail": "fix"}]
    out = Validator(base_spec(validation=fix)).validate(*batch(["baa", slow]))
    assert out.action == ["keep", "reject"] and out.output_text[0] == "b[removed]"
    assert out.error[1].endswith("its fix raised TimeoutError")


def test_deny_list_whole_words_case_insensitive():
    spec = DenyListRule(rule="deny_list", phrases=["guarantee", "legal  advice"])
    assert check(spec, "We guaranteed nothing.").passed  # whole words only
    r = check(spec, "This is Legal\nAdvice, a GUARANTEE.")
    assert not r.passed and r.message == "contains denied phrase(s): 'guarantee', 'legal  advice'"
    assert rule(DenyListRule(rule="deny_list", phrases=["guarantee"], on_fail="fix")).fix(
        Candidate("A Guarantee!")
    ) == "A [removed]!"


def test_a_deny_list_message_names_the_phrase_never_the_outputs_text():
    """IGNORECASE matches "kıll" (dotless i) for "kill", and casefold does not map it back: the
    message then quoted the output's own text (a value in rule_results and the dead letter)."""
    r = check(DenyListRule(rule="deny_list", phrases=["kill", "Legal advice"]), "we kıll it; LEGAL   ADVICE here")
    assert not r.passed and r.message == "contains denied phrase(s): 'Legal advice', 'kill'"
    assert "kıll" not in r.message and "LEGAL" not in r.message


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("", "empty answer"),
        ("   \n ", "empty answer"),
        ("I'm sorry, but I cannot help with that.", "starts like a refusal (\"i'm sorry\")"),
        ("As an AI language model, I have no opinion.", "starts like a refusal ('as an ai')"),
        ("the the the the the the the", "a 1-word sequence repeats 6 or more times in a row"),
        ("ok go " * 7, "a 2-word sequence repeats 6 or more times in a row"),
        ("Wait" + "!" * 40, "one character repeats 30 or more times in a row"),
    ],
)
def test_refusal_rule_fails(output, message):
    r = check(RefusalRule(rule="refusal"), output)
    assert not r.passed and r.message == message


@pytest.mark.parametrize(
    "output",
    [
        "Your order ships tomorrow.",
        "The customer said I cannot log in; reset the password.",  # a quoted refusal, not an opener
        "the the the the the",  # 5 repeats: under the default of 6
    ],
)
def test_refusal_rule_passes(output):
    assert check(RefusalRule(rule="refusal"), output).passed


def test_refusal_extra_phrases():
    spec = RefusalRule(rule="refusal", extra_phrases=["no comment"])
    assert not check(spec, "No comment.").passed


def test_pii_leakage_only_counts_pii_not_in_the_input():
    spec = PiiLeakageRule(rule="pii_leakage", on_fail="fix")
    prompt = "Customer jo@example.com, phone +44 20 7946 0958, asks about the refund."
    assert check(spec, "Reply to JO@example.com or call +442079460958.", prompt=prompt).passed  # normalised match
    r = check(spec, "Send it to eve@evil.io, card 4111 1111 1111 1111.", prompt=prompt)
    assert not r.passed and r.message == "PII not in the input: 1 card, 1 email"
    assert "evil" not in r.message  # messages never quote values
    fixed = rule(spec).fix(Candidate("Send it to eve@evil.io, card 4111 1111 1111 1111.", prompt=prompt))
    assert fixed == "Send it to [REDACTED:email], card [REDACTED:card]."
    # PII from the context documents counts as input too.
    assert check(spec, "Mail eve@evil.io", prompt="p", context=["eve@evil.io is the owner"]).passed


def test_pii_leakage_kinds_subset():
    spec = PiiLeakageRule(rule="pii_leakage", kinds=["email"])
    assert check(spec, "card 4111 1111 1111 1111").passed
    assert not check(spec, "mail a@b.io").passed


CONTEXT = [
    "Acme Corp shipped order 4411 on March 5, 2024. The refund of $1,299.50 was approved.",
    'The support lead, Dana Whitfield, said "we will call you within two days".',
]


@pytest.mark.parametrize(
    "output",
    [
        "Order 4411 shipped on 2024-03-05 [doc:1]. Acme Corp approved a refund of 1299.50 dollars.",
        'Dana Whitfield promised: "we will call you within two days" [doc:2].',
        "It shipped. Thanks for waiting, it will arrive soon.",  # no claims: nothing to contradict
        "The Acme Corp team shipped it in 5 March 2024.",
    ],
)
def test_grounding_passes(output):
    r = check(GroundingRule(rule="grounding"), output, context=CONTEXT)
    assert r.passed, r.message
    assert r.score == 1.0


def test_grounding_fails_on_invented_facts():
    spec = GroundingRule(rule="grounding", threshold=0.8)
    r = check(spec, "Globex Inc shipped order 9981 on 2023-01-02; Acme Corp refunded $1,299.50.", context=CONTEXT)
    assert not r.passed
    # claims: Globex Inc, 9981, 2023-01-02 (invented) and Acme Corp, 1,299.50 (found)
    assert r.score == pytest.approx(2 / 5)
    assert r.message == "2/5 claims found in the context (0.40 < 0.80); not found: 1 date, 1 entity, 1 number"
    quote = check(spec, 'Dana Whitfield said "refunds are instant".', context=CONTEXT)
    assert not quote.passed and "1 quote" in quote.message


def test_grounding_finds_whole_numbers_and_names_not_pieces_of_them():
    """Before stop 44 claims were substrings of the context: 45, 20 and 99 were "found" in 1450,
    2024 and 3,999, Max in Maximilian, Ann in annual: an answer with no support scored 1.0."""
    context = ["Order 1450 was placed in 2024 by the Maximilian Group; the annual fee is 3,999."]
    spec = GroundingRule(rule="grounding", threshold=0.5)
    numbers = check(spec, "We refunded 45 dollars for 20 units and 99 items.", context=context)
    assert not numbers.passed and numbers.score == 0.0, numbers.message
    names = check(spec, "The invoice went to Max Smith and Ann Lee.", context=context)
    assert not names.passed and names.score == 0.0, names.message
    found = check(spec, "Order 1450 (2024) for the Maximilian Group: a fee of 3,999.", context=context)
    assert found.passed and found.score == 1.0, found.message


def test_a_long_run_of_whitespace_after_a_name_is_linear_for_the_claim_finder():
    """The entity pattern split a whitespace run in O(k²) ways: a name followed by 40,000 newlines
    (a degenerate output) took 13.6 s of a stage worker, or of the online replica's event loop."""
    import time

    output = "Summary: The Answer" + "\n" * 40000 + "done"
    t0 = time.monotonic()
    check(GroundingRule(rule="grounding"), output, context=CONTEXT)
    assert time.monotonic() - t0 < 3.0  # ~0.01 s now; the old pattern's 13 s would fail this on any machine


def test_grounding_citations_must_name_a_document():
    r = check(GroundingRule(rule="grounding"), "Order 4411 shipped [doc:1][doc:3].", context=CONTEXT)
    assert not r.passed and r.message == "cites 1 missing document(s) (2 given)"
    # The citation's digits are the model's (a card number, say): counted, never quoted; any length.
    card = "4111111111111111"
    r = check(GroundingRule(rule="grounding"), f"Paid [doc: {card}] [doc:{'9' * 5000}] [doc:0].", context=CONTEXT)
    assert not r.passed and r.message == "cites 3 missing document(s) (2 given)" and card not in r.message
    r = check(GroundingRule(rule="grounding", check=["numbers"]), "Order 4411 [doc:3].", context=CONTEXT)
    assert r.passed  # citations not checked


def test_json_schema_rule_with_pydantic_and_inline_schemas():
    spec = {"rule": "json_schema"}
    from schemas.validation import JsonSchemaRule

    model = OutputSchema("schemas.examples:TicketTriage")
    r = build_rules([JsonSchemaRule(**spec)], model)[0]
    good = Candidate('{"category":"billing","priority":2,"summary":"double charge"}')
    assert r.check(good).passed and good.output_json == '{"category":"billing","priority":2,"summary":"double charge"}'
    bad = r.check(Candidate('{"category":"food","priority":9,"summary":"x"}'))
    assert not bad.passed and bad.message.startswith("does not match the schema: category: Input should be")
    assert "priority: Input should be less than or equal to 5" in bad.message and "food" not in bad.message
    assert r.check(Candidate('{"category": "billing", ')).message.startswith("not valid JSON: ")

    inline = OutputSchema({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]})
    r = build_rules([JsonSchemaRule(**spec)], inline)[0]
    assert r.check(Candidate('{"n": 2}')).passed
    assert r.check(Candidate('{"n": 7}')).message == "does not match the schema: n: fails 'maximum' 3"
    assert r.check(Candidate("{}")).message == "does not match the schema: (root): fails 'required' [\"n\"]"


@pytest.mark.parametrize("schema", ["schemas.examples:TicketTriage", {"type": "array", "items": {"type": "array"}}])
def test_a_degenerate_deeply_nested_output_fails_the_rule_not_the_job(schema):
    """A model can emit "[[[[..." for hundreds of tokens: json.loads (or the schema check of what
    it parsed) runs out of stack with a RecursionError, which no rule catches; it is the rule's
    failure instead, so the row is retried or dead-lettered and the job goes on."""
    from schemas.validation import JsonSchemaRule

    r = build_rules([JsonSchemaRule(rule="json_schema")], OutputSchema(schema))[0]
    deep = r.check(Candidate("[" * 5000 + "]" * 5000))  # past json.loads's limit
    assert not deep.passed and deep.message == "not valid JSON: nested too deeply"
    r.check(Candidate("[" * 900 + "]" * 900))  # within it, deep for the schema's check: an answer either way


@pytest.mark.parametrize("schema", ["schemas.examples:TicketTriage", {"type": "object"}])
def test_outputs_that_are_not_json_text_fail_the_rule_and_never_reach_output_json(schema):
    """Before stop 44: a lone surrogate escape passed the inline schema, and the Arrow column of
    output_json then raised UnicodeEncodeError: the batch, and the job, failed (again on restart).
    NaN, Infinity and 1e999 passed (NaN fails no `minimum`) into an output_json no JSON reader
    takes; a repeated key kept its last value while output_text showed the first."""
    from schemas.validation import JsonSchemaRule

    r = build_rules([JsonSchemaRule(rule="json_schema")], OutputSchema(schema))[0]
    base = '"category":"billing","priority":2,"summary":'
    for text, why in ((f'{{{base}"half \\ud83d emoji"}}', "lone surrogate"), (f'{{{base}"x","score":NaN}}', "NaN"),
                      (f'{{{base}"x","score":-Infinity}}', "-Infinity"), (f'{{{base}"x","score":1e999}}', "too large"),
                      (f'{{{base}"x","priority":3}}', "repeats a key")):  # fmt: skip
        res = r.check(Candidate(text))
        assert not res.passed and res.message.startswith("not valid JSON: ") and why in res.message, (text, res.message)


def test_a_strict_pydantic_model_takes_its_json_forms():
    """A model with ConfigDict(strict=True): its enum, date, UUID and tuple fields come as JSON
    text and arrays, which strict Python-mode validation refused (every row retried, then
    rejected, before stop 44); JSON mode takes them, and still refuses a number for a string."""
    from schemas.validation import JsonSchemaRule

    r = build_rules([JsonSchemaRule(rule="json_schema")],
                    OutputSchema("tests.strict_models:StrictTicket", allowed_modules=["tests"]))[0]  # fmt: skip
    good = Candidate('{"category":"billing","due":"2026-12-07","ref":"9b2f4c1e-8d4a-4b7e-9c1f-2a3b4c5d6e7f",'
                     '"span":[1,2],"score":0.5}')  # fmt: skip
    assert r.check(good).passed, r.check(good).message
    assert good.parsed.due.isoformat() == "2026-12-07" and good.parsed.span == (1, 2)
    bad = r.check(Candidate('{"category":"billing","due":20261207,"ref":"9b2f4c1e-8d4a-4b7e-9c1f-2a3b4c5d6e7f",'
                            '"span":[1,2],"score":0.5}'))  # fmt: skip
    assert not bad.passed and "due" in bad.message and "20261207" not in bad.message


def test_output_schema_errors_name_the_field():
    with pytest.raises(SpecError, match=r"output.schema: refusing to import nope.mod:Model: module 'nope' not found"):
        OutputSchema("nope.mod:Model")
    with pytest.raises(SpecError, match=r"output.schema: cannot import module 'nope.mod': ModuleNotFoundError"):
        OutputSchema("nope.mod:Model", allowed_modules=["nope"])  # allowed, but not there
    with pytest.raises(SpecError, match=r"output.schema: module 'schemas.examples' has no attribute 'Nope'"):
        OutputSchema("schemas.examples:Nope")
    with pytest.raises(SpecError, match=r"output.schema: not a valid JSON Schema"):
        OutputSchema({"type": "objekt"})


# -- custom rules (functions and classes referenced by import path) --------------------------------


def no_digits(candidate, limit=0):
    n = sum(ch.isdigit() for ch in candidate.output)
    return (n <= limit, float(n), f"{n} digit(s)")


class MaxWords:
    def __init__(self, words: int):
        self.words = words

    def check(self, candidate):
        n = len(candidate.output.split())
        return RuleResult("ignored", n <= self.words, None, f"{n} words")

    def fix(self, candidate):
        return " ".join(candidate.output.split()[: self.words])


def test_custom_rules_function_and_class():
    spec = base_spec(
        validation=[
            {"rule": "custom", "path": "tests.test_validation:no_digits", "options": {"limit": 1}},
            {"rule": "custom", "path": "tests.test_validation:MaxWords", "options": {"words": 2}, "on_fail": "fix", "name": "words"},
        ]
    )
    v = Validator(spec)
    out = v.validate(*batch(["a 1 b c", "a 12"]))
    assert out.action == ["keep", "keep"] and out.status == ["ok", "flagged"]
    assert out.output_text == ["a 1", "a 12"]
    assert out.rule_results.to_pylist()[1][0] == {"rule": "custom", "passed": False, "score": 2.0, "message": "2 digit(s)"}
    assert out.rule_results.to_pylist()[0][1] == {"rule": "words", "passed": False, "score": None, "message": "4 words (fixed)"}


def picky(candidate):
    """A rule with a bug on some outputs: a KeyError that quotes the output."""
    if "boom" in candidate.output:
        raise KeyError(candidate.output)
    return True


def test_a_custom_rule_that_raises_fails_the_row_not_the_job():
    """The rule's on_fail applies to a row its check raised on (reject: a dead letter); the
    other rows pass; the stored message names the exception's type, never its text."""
    spec = base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:picky", "on_fail": "reject"}])
    out = Validator(spec).validate(*batch(["fine", "boom secret-4711"]))
    assert out.action == ["keep", "reject"]
    assert out.rule_results.to_pylist()[1][0]["message"] == "custom rule raised KeyError"
    assert "secret-4711" not in out.error[1] and "KeyError" in out.error[1]


def forgetful(candidate):
    """A rule with a branch that forgets its return (None), and one whose score is no number; numpy's
    bool (a comparison of numpy scores) is a bool."""
    import numpy as np

    if "long" in candidate.output:
        return True
    if "numpy" in candidate.output:
        return np.float64(0.9) > 0.8
    if "scored" in candidate.output:
        return (False, "high", "score given as a word")


def test_a_custom_rule_that_returns_no_result_fails_the_row_not_the_job():
    spec = base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:forgetful", "on_fail": "reject"}])
    out = Validator(spec).validate(*batch(["long enough", "short secret-4711", "scored secret-4711", "numpy says yes"]))
    assert out.action == ["keep", "reject", "reject", "keep"]
    messages = [r[0]["message"] for r in out.rule_results.to_pylist()]
    assert messages[1] == "custom rule returned NoneType, not a RuleResult, a bool or (passed, score, message)"
    assert messages[2].startswith("custom rule returned tuple") and "secret-4711" not in out.error[2]


class Brittle:
    """A rule whose check and fix both raise on some outputs (quoting them)."""

    def check(self, candidate):
        if "boom" in candidate.output:
            raise ValueError(candidate.output)
        return True

    def fix(self, candidate):
        raise ValueError(candidate.output)


def test_a_custom_fix_that_raises_rejects_the_row_not_the_job():
    spec = base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:Brittle", "on_fail": "fix"}])
    out = Validator(spec).validate(*batch(["fine", "boom secret-4711"]))
    assert out.action == ["keep", "reject"]
    assert out.error[1].endswith("custom: its fix raised ValueError") and "secret-4711" not in out.error[1]


def test_custom_rule_errors_are_spec_errors():
    with pytest.raises(SpecError, match=r"validation.0.path: module 'tests.test_validation' has no attribute 'nope'"):
        Validator(base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:nope"}]))
    with pytest.raises(SpecError, match=r"validation.0: on_fail fix needs a rule class with a fix"):
        Validator(base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:no_digits", "on_fail": "fix"}]))
    with pytest.raises(SpecError, match=r"validation.0.options: tests.test_validation:MaxWords: .*unexpected keyword"):
        Validator(base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:MaxWords", "options": {"x": 1}}]))


# -- spec checks -----------------------------------------------------------------------------------


def base_spec(**extra):
    data = {
        "name": "v",
        "source": {"kafka": {"topic": "t"}},
        "prompt": {"template": "{{ q }}", "id_field": "id", "context_field": "docs"},
        "model": {"path": "m"},
        "sink": {"results": "r", "dead_letter": "d"},
    }
    data.update(extra)
    return parse_spec(data)


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ([{"rule": "refusal", "on_fail": "fix"}], "validation.0.refusal: Value error, rule refusal: has no deterministic fix"),
        ([{"rule": "length", "min_chars": 3, "on_fail": "fix"}], "rule length: has no deterministic fix"),
        ([{"rule": "regex", "must_match": ["("]}], "validation.0.regex.must_match: Value error, pattern '(' is not a valid"),
        ([{"rule": "nope"}], "validation.0: Input tag 'nope' found using 'rule' does not match"),
        ([{"rule": "json_schema"}], "validation.0 (json_schema) needs output.schema"),
        ([{"rule": "refusal"}, {"rule": "refusal"}], "rule names must be unique, repeated: refusal"),
        ([{"rule": "refusal", "on_fail": "retry", "max_attempts": 0}], "validation.0.refusal.max_attempts: Input should be greater"),
        ([{"rule": "pii_leakage", "kinds": ["ssn"]}], "validation.0.pii_leakage.kinds.0: Input should be"),
        # ignored before stop 43: only a retry has attempts and a final policy
        ([{"rule": "refusal", "on_fail": "flag", "max_attempts": 3, "then": "flag"}],
         "rule refusal: max_attempts and then apply to on_fail: retry only (this rule's on_fail is flag)"),
    ],
)
def test_bad_rule_specs_name_the_field(validation, message):
    with pytest.raises(SpecError) as e:
        base_spec(validation=validation)
    assert message in str(e.value)


def test_grounding_needs_a_context_field():
    with pytest.raises(SpecError, match=r"validation.0 \(grounding\) needs prompt.context_field"):
        parse_spec(
            {
                "name": "v",
                "source": {"kafka": {"topic": "t"}},
                "prompt": {"template": "{{ q }}", "id_field": "id"},
                "model": {"path": "m"},
                "sink": {"results": "r", "dead_letter": "d"},
                "validation": [{"rule": "grounding"}],
            }
        )


def test_default_and_explicit_rule_sets():
    assert [r.label for r in base_spec().rules] == ["refusal", "pii_leakage"]
    assert base_spec(validation=[]).rules == []
    with_schema = base_spec(validation=[], output={"schema": "schemas.examples:TicketTriage"})
    assert [(r.label, r.on_fail, r.max_attempts, r.then) for r in with_schema.rules] == [("json_schema", "retry", 2, "reject")]


# -- the validation stage: policies ----------------------------------------------------------------


def batch(outputs: list[str], attempt: int = 1, prompt: str = "q", context=None):
    n = len(outputs)
    req = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "prompt": [prompt] * n,
            "source_topic": ["t"] * n,
            "source_partition": [0] * n,
            "source_offset": list(range(n)),
            "received_ns": [0] * n,
            "attempt": [attempt] * n,
            "first_prompt": [None if attempt == 1 else "first q"] * n,
            "context": [context] * n,
            "tenant": [None] * n,
            "max_tokens": [None] * n,
        },
        schema=REQUEST_SCHEMA,
    )
    comp = pa.table(
        {
            "source_partition": [0] * n,
            "source_offset": list(range(n)),
            "output_text": outputs,
            "finish_reason": ["stop"] * n,
            "prompt_tokens": [3] * n,
            "completion_tokens": [4] * n,
            "error_stage": [None] * n,
            "error_class": [None] * n,
            "error": [None] * n,
        },
        schema=COMPLETION_SCHEMA,
    )
    return req, comp


POLICY_RULES = [
    {"rule": "length", "max_chars": 30, "on_fail": "fix"},
    {"rule": "refusal", "on_fail": "retry", "max_attempts": 3, "then": "reject"},
    {"rule": "deny_list", "phrases": ["lawsuit"], "on_fail": "flag"},
    {"rule": "pii_leakage", "on_fail": "reject"},
]


def test_policies_keep_fix_flag_reject_retry():
    v = Validator(base_spec(validation=POLICY_RULES))
    outputs = [
        "Your parcel ships today.",  # passes
        "Your parcel ships today, and we are sorry for the delay.",  # too long: fixed
        "No lawsuit is needed.",  # flagged
        "Mail eve@evil.io please.",  # leaked PII: rejected
        "I cannot help with that.",  # refusal: retried
        "I cannot help, no lawsuit, mail eve@evil.io",  # retry wins over every other policy
    ]
    out = v.validate(*batch(outputs))
    assert out.action == ["keep", "keep", "keep", "reject", "retry", "retry"]
    assert out.status[:3] == ["ok", "ok", "flagged"]
    assert out.output_text[1] == "Your parcel ships today, and w"
    assert out.error[3] == "pii_leakage: PII not in the input: 1 email"
    assert [len(r) for r in out.rule_results.to_pylist()] == [4] * 6
    retries = out.retries.to_pylist()
    assert [r["source_offset"] for r in retries] == [4, 5] and all(r["attempt"] == 2 for r in retries)
    assert all(r["first_prompt"] == "q" for r in retries)
    assert retries[0]["prompt"] == (
        "q\n\nYour previous answer was:\nI cannot help with that.\n\n"
        "It was rejected: refusal: starts like a refusal ('i cannot')\nAnswer again and fix this."
    )


def test_fixes_redact_before_they_truncate_and_a_fix_that_does_not_repair_rejects():
    """Before stop 44 fixes ran in rule order and were trusted: a length fix listed before the PII
    fix cut a card number to 14 digits, which pii_leakage no longer detects, and the row was kept
    "ok" with "(fixed)"; a redaction that pushed the text over max_chars was kept too."""
    rules = [{"rule": "length", "max_chars": 38, "on_fail": "fix"}, {"rule": "pii_leakage", "on_fail": "fix"}]
    v = Validator(base_spec(validation=rules))
    out = v.validate(*batch(["Your card on file is 4111 1111 1111 1111, thanks"]))
    assert out.action == ["keep"] and "1111" not in out.output_text[0] and len(out.output_text[0]) <= 38, out

    rules = [{"rule": "deny_list", "phrases": ["lawsuit"], "on_fail": "fix"}]
    v = Validator(base_spec(validation=rules))
    deny = v.rules[0]
    deny.fix = lambda cand: cand.output  # its fix repairs nothing (a custom fix can do this)
    out = v.validate(*batch(["No lawsuit is needed."]))
    assert out.action == ["reject"] and out.error[0].endswith("after the fixes still failing: deny_list"), out.error


def test_a_repair_template_may_use_only_its_own_variables_and_a_failing_one_rejects_the_row():
    """Before stop 44 a repair template naming an event field passed `tidegate check` and, at the
    first retry, stopped the batch (and the job) with UndefinedError. The spec refuses it now; a
    template that raises anyway (its own code) rejects that row, the batch goes on."""
    with pytest.raises(SpecError, match=r"prompt.repair_template: .*uses question: a repair template is given attempt, output"):
        base_spec(prompt={"template": "{{ question }}", "id_field": "id", "repair_template": "{{ question }}: {{ output }}"})
    rules = [{"rule": "refusal", "on_fail": "retry", "max_attempts": 3}]
    spec = base_spec(validation=rules, prompt={"template": "{{ q }}", "id_field": "id",
                                                "repair_template": "{{ prompt }} {{ 1 // (attempt - attempt) }}"})  # fmt: skip
    out = Validator(spec).validate(*batch(["I cannot help with that.", "Fine answer."]))
    assert out.action == ["reject", "keep"]
    assert out.error[0].endswith("prompt.repair_template raised ZeroDivisionError"), out.error


def test_spent_retries_fall_back_to_then():
    rules = [{"rule": "refusal", "on_fail": "retry", "max_attempts": 3, "then": "flag"}]
    v = Validator(base_spec(validation=rules))
    assert v.validate(*batch(["I cannot."], attempt=2)).action == ["retry"]
    out = v.validate(*batch(["I cannot."], attempt=3))
    assert out.action == ["keep"] and out.status == ["flagged"] and out.retries is None
    # The repair prompt is built from the first prompt, not from the previous repair prompt.
    again = v.validate(*batch(["I cannot."], attempt=2, prompt="repair text"))
    assert again.retries.column("prompt")[0].as_py().startswith("first q\n")


def test_a_fix_that_breaks_the_schema_is_rejected():
    rules = [{"rule": "json_schema"}, {"rule": "length", "max_chars": 50, "on_fail": "fix"}]
    v = Validator(base_spec(validation=rules, output={"schema": "schemas.examples:TicketTriage"}))
    short = '{"category":"billing","priority":2,"summary":"x"}'  # 49 characters
    long = '{"category":"billing","priority":2,"summary":"long enough"}'
    out = v.validate(*batch([short, long]))
    assert out.action == ["keep", "reject"]
    assert out.output_json[0] == short and out.output_json[1] is None
    assert out.error[1] == (
        "length: 59 characters > max_chars 50 (fixed); after the fixes: not valid JSON: "
        "Unterminated string starting at at character 45"
    )


def test_output_json_is_the_validated_object():
    v = Validator(base_spec(validation=[], output={"schema": "schemas.examples:TicketTriage"}))
    out = v.validate(*batch(['{"category":"shipping","priority":5,"summary":"late"}', '{"category":"x"}']))
    assert out.action == ["keep", "retry"]
    assert out.output_json[0] == '{"category":"shipping","priority":5,"summary":"late"}'
    assert out.output_json[1] is None
    spent = v.validate(*batch(['{"category":"x"}'], attempt=2))
    assert spent.action == ["reject"] and spent.error[0].startswith("json_schema: does not match the schema")


def test_rule_results_arrow_column():
    v = Validator(base_spec(validation=[{"rule": "refusal"}]))
    out = v.validate(*batch(["fine answer", ""]))
    arr = out.rule_results_array()
    assert arr.type == pa.list_(pa.struct([("rule", pa.string()), ("passed", pa.bool_()), ("score", pa.float64()), ("message", pa.string())]))
    assert arr.to_pylist()[1] == [{"rule": "refusal", "passed": False, "score": None, "message": "empty answer"}]


def test_assembler_routes_kept_rejected_failed_and_retried_rows():
    """The stage workers' join (compute/assemble.py), pure: one source batch, one engine call."""
    from compute.assemble import BatchAssembler
    from schemas.records import RESULTS_SCHEMA, SOURCE_SCHEMA

    spec = base_spec(validation=POLICY_RULES)
    outputs = ["Your parcel ships today.", "Mail eve@evil.io please.", "I cannot help with that.", "unused"]
    req, comp = batch(outputs)
    # The engine failed on the last row (per-row error): it becomes a dead letter of stage engine.
    comp = comp.set_column(comp.schema.get_field_index("error_stage"), "error_stage", pa.array([None, None, None, "engine"]))
    comp = comp.set_column(comp.schema.get_field_index("error_class"), "error_class", pa.array([None] * 3 + ["engine_crash"]))
    comp = comp.set_column(comp.schema.get_field_index("error"), "error", pa.array([None] * 3 + ["boom"]))
    src = pa.table(
        {
            "topic": ["t"] * 4, "partition": [0] * 4, "offset": list(range(4)), "key": [None] * 4,
            "value": [f"raw{i}".encode() for i in range(4)], "timestamp_ms": [0] * 4, "received_ns": [0] * 4,
            "source_change": [None] * 4,
        },
        schema=SOURCE_SCHEMA,
    )  # fmt: skip
    lineage = {"model_path": "m", "run_id": "ignored"}
    out = BatchAssembler(spec, Validator(spec), RESULTS_SCHEMA, "run1", lineage).assemble(src, req, comp, {})

    results, dead = out.output.results, out.output.dead
    assert results.column("id").to_pylist() == ["r0"] and results.column("status").to_pylist() == ["ok"]
    assert results.column("model_path").to_pylist() == ["m"] and results.column("run_id").to_pylist() == ["run1"]
    assert results.column("latency_ms")[0].as_py() > 0  # received_ns 0 on this clock: long ago
    assert dead.select(["id", "stage", "error_class"]).to_pylist() == [
        {"id": "r3", "stage": "engine", "error_class": "engine_crash"},
        {"id": "r1", "stage": "validate", "error_class": "validation_failed"},
    ]
    assert dead.column("raw").to_pylist() == [b"raw3", b"raw1"]  # the raw event of each, by position
    assert dead.column("output_text").to_pylist() == [None, "Mail eve@evil.io please."]
    assert out.retries.column("id").to_pylist() == ["r2"]
    assert out.rule_failures == {"pii_leakage": 1, "refusal": 1}


def test_assembler_without_engine_errors_dead_letters_only_the_rejected_rows():
    """The usual batch (no engine error: the assembler skips the error mask) still routes a
    rejection to the dead letters and a retry back, and builds every results column."""
    from compute.assemble import BatchAssembler
    from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA, SOURCE_SCHEMA

    spec = base_spec(validation=POLICY_RULES)
    req, comp = batch(["Your parcel ships today.", "Mail eve@evil.io please.", "I cannot help with that."])
    src = pa.table({"topic": ["t"] * 3, "partition": [0] * 3, "offset": [0, 1, 2], "key": [None] * 3,
                    "value": [b"raw0", b"raw1", b"raw2"], "timestamp_ms": [0] * 3, "received_ns": [0] * 3,
                    "source_change": [None] * 3}, schema=SOURCE_SCHEMA)  # fmt: skip
    lineage = {"model_path": "m", "spec_hash": "h"}
    assembler = BatchAssembler(spec, Validator(spec), RESULTS_SCHEMA, "run1", lineage)
    out = assembler.assemble(src, req, comp, {})
    results, dead = out.output.results, out.output.dead
    assert results.schema.equals(RESULTS_SCHEMA) and dead.schema.equals(DEAD_LETTER_SCHEMA)
    assert results.column("id").to_pylist() == ["r0"]
    assert results.select(["model", "run_id", "model_path", "spec_hash", "model_revision"]).to_pylist() == [
        {"model": spec.model.label, "run_id": "run1", "model_path": "m", "spec_hash": "h", "model_revision": None}]
    assert results.column("latency_ms").type == pa.float64() and results.column("latency_ms")[0].as_py() > 0
    assert dead.select(["id", "stage", "raw"]).to_pylist() == [{"id": "r1", "stage": "validate", "raw": b"raw1"}]
    assert out.retries.column("id").to_pylist() == ["r2"]
    # all kept: no dead letters, the same empty table every time
    ok_req, ok_comp = batch(["Your parcel ships today."])
    a, b = (assembler.assemble(src.slice(0, 1), ok_req, ok_comp, {}).output.dead for _ in range(2))
    assert a.num_rows == 0 and a.schema.equals(DEAD_LETTER_SCHEMA) and a is b


def test_no_rules_keeps_every_output():
    """validation: [] — every row kept as it is, with an empty rule_results list."""
    v = Validator(base_spec(validation=[]))
    req, comp = batch(["a", "b", ""])
    out = v.validate(req, comp)
    assert out.action == ["keep"] * 3 and out.status == ["ok"] * 3
    assert out.rule_results.to_pylist() == [[], [], []] and out.failures == {}


class KeyedModel(BaseModel):
    """An output model whose own validator reads a key the output may lack (raises KeyError, which
    pydantic passes through rather than wrapping in a ValidationError)."""

    x: int

    @model_validator(mode="before")
    @classmethod
    def _needs_x(cls, data):
        return {"x": data["x"]}


class ForgetfulFix:
    """A rule whose fix forgot its return (None)."""

    def check(self, candidate):
        return "bad" not in candidate.output

    def fix(self, candidate):
        candidate.output.replace("bad", "good")


def test_an_output_models_own_error_or_a_fix_that_returns_no_text_fails_the_row_not_the_job():
    """Before, a KeyError from the output model's validator, or a custom fix returning None with
    an output schema (json.loads(None)), raised out of the validation stage: the job stopped, on the
    same row at every restart."""
    v = Validator(base_spec(validation=[{"rule": "json_schema", "on_fail": "reject"}],
                            output={"schema": "tests.test_validation:KeyedModel"}))  # fmt: skip
    out = v.validate(*batch(['{"x": 1}', "{}"]))
    assert out.action == ["keep", "reject"] and out.output_json[0] == '{"x":1}'
    assert out.error[1] == "json_schema: does not match the schema: the schema's model raised KeyError"
    fixing = Validator(base_spec(validation=[{"rule": "custom", "path": "tests.test_validation:ForgetfulFix",
                                              "on_fail": "fix"}], output={"schema": "tests.test_validation:KeyedModel"}))  # fmt: skip
    out = fixing.validate(*batch(['{"x": 2}', '{"x": 3, "bad": 1}']))
    assert out.action == ["keep", "reject"]
    assert out.error[1] == "custom: custom rule failed; custom: its fix returned NoneType, not text"


def test_a_long_context_without_sentence_ends_is_split_in_one_pass():
    """Semantic grounding cuts a long "sentence" into pieces that fit the embedding model; it
    counted the whole rest again for every cut: a 200 KB document with no sentence end took 3.7 s
    of every row's check (before stop 44). Now one pass: well under a second."""
    import time

    from compute.semantic import MAX_SENTENCE_UNITS, _units, chunks, sentences

    text = "parcel " * 30000  # 210,000 characters, one "sentence"
    t0 = time.thread_time()  # CPU time: a busy machine's waits for the core are not the split's
    pieces, context = sentences(text), chunks([text], 480)
    assert time.thread_time() - t0 < 2.0
    assert len(pieces) > 400 and all(_units(p) <= MAX_SENTENCE_UNITS for p in pieces + context)
    assert "".join(p.replace(" ", "") for p in pieces) == text.replace(" ", "")  # nothing lost


def test_an_online_chats_retry_keeps_its_conversation_and_its_whole_input_counts_for_pii():
    """Before stop 44 a chat's retry dropped `messages` (the repair ran without the client's system
    prompt and history), and pii_leakage took the last user message alone for the input: an email
    the system prompt gave and the answer repeated was a "leak" (a 422 with on_fail: reject)."""
    import json

    rules = [{"rule": "pii_leakage", "on_fail": "reject"}, {"rule": "refusal", "on_fail": "retry", "max_attempts": 2}]
    v = Validator(base_spec(validation=rules))
    chat = [{"role": "system", "content": "You answer for jo@acme.io's team."},
            {"role": "user", "content": "Who do I write to?"}]  # fmt: skip
    req, comp = batch(["Write to jo@acme.io, they answer within a day.", "I cannot help with that."],
                      prompt="Who do I write to?")  # fmt: skip
    req = req.append_column("messages", pa.array([json.dumps(chat)] * 2, pa.string()))
    out = v.validate(req, comp)
    assert out.action == ["keep", "retry"], out.error
    (retry,) = out.retries.to_pylist()
    again = json.loads(retry["messages"])
    assert again[0] == chat[0] and again[-1]["role"] == "user" and again[-1]["content"] == retry["prompt"]
    assert "I cannot help with that." in retry["prompt"] and json.loads(retry["input_messages"]) == chat
    # The retry's answer is judged against the chat as first asked, not against the repair prompt,
    # which holds the rejected output: a value only that output had is still a leak.
    leaked_before = '{"x": "mail eve@evil.io"}'
    comp2 = comp.slice(1, 1).set_column(comp.schema.get_field_index("output_text"), "output_text",
                                        pa.array(["Mail eve@evil.io."], pa.string()))  # fmt: skip
    retries = out.retries.set_column(out.retries.schema.get_field_index("prompt"), "prompt",
                                     pa.array([retry["prompt"] + " " + leaked_before], pa.string()))  # fmt: skip
    second = v.validate(retries, comp2)
    assert second.action == ["reject"] and "1 email" in second.error[0]


def test_folding_adds_to_what_deny_list_and_refusal_catch_never_takes_away():
    """Review of stop 44's folding: a zero-width space standing for a word's edge ("bad\\u200bstuff")
    is caught as written; a non-ASCII phrase ("Straße") catches its ASCII form; a refusal's own
    openers are folded as the output is ("sorry…", "- n/a"); and a length fix beside max_tokens
    keeps its truncated row (its token count is not checked again: no generation made that text)."""
    deny = DenyListRule(rule="deny_list", phrases=["bad", "Straße"], on_fail="fix")
    assert not check(deny, "this is bad\u200bstuff é").passed
    assert rule(deny).fix(Candidate("this is bad\u200bstuff é")) == "this is [removed]\u200bstuff é"
    assert not check(deny, "ship to Strasse 5").passed
    refusal = RefusalRule(rule="refusal", extra_phrases=["sorry…", "- n/a"])
    assert not check(refusal, "Sorry… I cannot help é").passed and not check(refusal, "- n/a").passed
    v = Validator(base_spec(validation=[{"rule": "length", "max_chars": 20, "max_tokens": 5, "on_fail": "fix"}]))
    req, comp = batch(["x" * 50])
    comp = comp.set_column(comp.schema.get_field_index("completion_tokens"), "completion_tokens", pa.array([30], pa.int32()))
    out = v.validate(req, comp)
    assert out.action == ["keep"] and out.output_text == ["x" * 20], out.error
