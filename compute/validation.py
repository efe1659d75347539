"""The validation stage: run the job's rules over a batch of outputs and decide each row's fate.

    in : requests (REQUEST_SCHEMA rows) and their successful completions (COMPLETION_SCHEMA rows),
         same length, same order
    out: Verdicts, per row one of
           keep    -> a results row: status ok|flagged, output_text (after fixes), output_json, rule_results
           reject  -> a dead-letter row (stage validate, error_class validation_failed) naming every failed rule
           retry   -> a new request: the repair prompt, attempt + 1

Policy per failed rule (schemas.validation): a `retry` rule with generations left sends the row
back to the engine (whatever the other rules said: the new output is checked from scratch);
otherwise each failed rule's policy applies (`then` for spent retry rules), and `reject` wins
over `fix`, which is applied before `flag`. Pure logic: no Ray, no I/O (the semantic grounding
rule calls its embedder, which may be a Ray actor).
"""

from __future__ import annotations

import json

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compute.rules import (
    Candidate, Custom, DenyList, Grounding, JsonSchema, Length, OutputSchema, PiiLeakage, Refusal, Regex, Rule,
    RuleResult,
)  # fmt: skip
from compute.semantic import SemanticGrounding
from schemas.errors import SpecError
from schemas.records import REQUEST_SCHEMA, RULE_RESULTS_TYPE
from schemas.spec import JobSpec


@dataclass
class Verdicts:
    action: list[str] = field(default_factory=list)  # keep | reject | retry, per input row
    status: list[str | None] = field(default_factory=list)  # keep: ok | flagged
    output_text: list[str | None] = field(default_factory=list)  # the final (possibly fixed) output
    output_json: list[str | None] = field(default_factory=list)
    rule_results: pa.Array | None = None  # RULE_RESULTS_TYPE, one list per input row
    error: list[str | None] = field(default_factory=list)  # reject: every failed rule and why
    retries: pa.Table | None = None  # REQUEST_SCHEMA rows for the rows to retry
    failures: dict[str, int] = field(default_factory=dict)  # rule -> failed checks in this batch

    def rule_results_array(self, mask: list[bool] | None = None) -> pa.Array:
        if mask is None:
            return self.rule_results
        return self.rule_results.filter(pa.array(mask, pa.bool_()))


class Validator:
    def __init__(self, spec: JobSpec, embedder=None):
        allowed = spec.allowed_modules
        self.output_schema = OutputSchema(spec.output.schema_, allowed) if spec.output.schema_ is not None else None
        self.rules: list[Rule] = build_rules(spec.rules, self.output_schema, embedder, allowed)
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.repair_template = env.from_string(spec.prompt.repair_template)

    def semantic_rules(self) -> list:
        """Rules that need an embedding model (the job starts one worker per model)."""
        return [r for r in self.rules if isinstance(r, SemanticGrounding)]

    @property
    def json_schema(self) -> dict | None:
        """The schema the engine constrains generation to (None: free text)."""
        return self.output_schema.json_schema if self.output_schema is not None else None

    def validate(self, requests: pa.Table, completions: pa.Table) -> Verdicts:
        outputs = completions.column("output_text").to_pylist()
        prompts = requests.column("prompt").to_pylist()
        first = requests.column("first_prompt").to_pylist()
        contexts = requests.column("context").to_pylist()
        tokens = completions.column("completion_tokens").to_pylist()
        finish = completions.column("finish_reason").to_pylist()
        attempts = requests.column("attempt").to_pylist()
        sources = [f or p for p, f in zip(prompts, first)]  # what a repair prompt is built from
        # What the rules take for the input (pii_leakage: a value in it is not a leak): an online
        # chat's every message, the system prompt and history too, as first asked (a retry's
        # messages hold the rejected output). Before stop 44 it was the last user message only.
        chats = _column(requests, "input_messages") or _column(requests, "messages")
        inputs = [_chat_text(m) if m else src for m, src in zip(chats, sources)] if chats else sources
        cands = [
            Candidate(o or "", inp, ctx or [], t or 0, fr)
            for o, inp, ctx, t, fr in zip(outputs, inputs, contexts, tokens, finish)
        ]
        by_rule = [rule.check_batch(cands) for rule in self.rules]
        n = len(cands)
        # Rows every rule passed are kept as they are; only the others go through the policies.
        v = Verdicts(["keep"] * n, ["ok"] * n, [c.output for c in cands], [c.output_json for c in cands], None, [None] * n)
        failures: Counter[str] = Counter()
        retry_rows: list[int] = []
        repair_prompts: list[str] = []
        for i in sorted({i for results in by_rule for i, r in enumerate(results) if not r.passed}):
            cand = cands[i]
            results = [r[i] for r in by_rule]
            failed = [(rule, res) for rule, res in zip(self.rules, results) if not res.passed]
            failures.update(res.rule for _, res in failed)
            attempt = attempts[i] or 1
            repair = None
            if any(rule.spec.on_fail == "retry" and attempt < rule.spec.max_attempts for rule, _ in failed):
                repair = self._repair_prompt(cand, failed, attempt, sources[i])
            if isinstance(repair, RepairFailed):  # the repair template failed on this row: rejected, the batch goes on
                action, status, text, error = "reject", None, cand.output, f"{_violations(failed)}; {repair}"
            elif repair is not None:
                action, status, text, error = "retry", None, cand.output, None
                retry_rows.append(i)
                repair_prompts.append(repair)
            else:
                action, status, text, error = self._apply_policies(cand, failed, results)
            v.action[i] = action
            v.status[i] = status if action == "keep" else None
            v.output_text[i] = text
            v.output_json[i] = cand.output_json if action == "keep" else None
            v.error[i] = error
        v.rule_results = rule_results_column(by_rule, n)  # after the policies: a fix notes itself in the message
        v.failures = dict(failures)
        if retry_rows:
            v.retries = _retry_requests(requests, retry_rows, repair_prompts)
        return v

    def _apply_policies(self, cand: Candidate, failed, results: list[RuleResult]):
        policies = {rule.name: (rule.spec.then if rule.spec.on_fail == "retry" else rule.spec.on_fail) for rule, _ in failed}
        if "reject" in policies.values():
            return "reject", None, cand.output, _violations(failed)
        text, fixed_any = cand.output, False
        # Truncation last: it must cut the text the other fixes redacted, or it can cut a card or
        # an email below what pii_leakage detects, leaving most of it (before stop 44: kept, "ok").
        for rule, res in sorted(failed, key=lambda rr: rr[0].spec.rule == "length"):
            if policies[rule.name] == "fix":
                try:
                    text = rule.fix(Candidate(text, cand.prompt, cand.context, cand.completion_tokens, cand.finish_reason))
                except Exception as e:  # noqa: BLE001 - a custom fix that cannot repair this output: rejected
                    return "reject", None, cand.output, f"{_violations(failed)}; {rule.name}: its fix raised {type(e).__name__}"
                if not isinstance(text, str):  # a custom fix that forgot its return: rejected, not a stopped job
                    return "reject", None, cand.output, (f"{_violations(failed)}; {rule.name}: its fix returned "
                                                         f"{type(text).__name__}, not text")  # fmt: skip
                res.message = f"{res.message} (fixed)" if res.message else "fixed"
                fixed_any = True
        if text != cand.output and self.output_schema is not None:
            # A repair must not produce an output_json that violates the schema.
            try:
                cand.output_json, cand.parsed = self.output_schema.parse(text)
            except ValueError as e:
                return "reject", None, cand.output, _violations(failed) + f"; after the fixes: {e}"
        if fixed_any:
            # The fixed text is checked again by the rules it must pass: the ones it was fixed for,
            # and the ones the output passed (a redaction can push it over a length). Before stop
            # 44 a fix was trusted: a fix that did not repair kept its row, marked "(fixed)".
            unfixed = self._still_failing(text, cand, {rule.name for rule, _ in failed if policies[rule.name] != "fix"})
            if unfixed:
                return "reject", None, cand.output, f"{_violations(failed)}; after the fixes still failing: {', '.join(unfixed)}"
        status = "flagged" if "flag" in policies.values() else "ok"
        return "keep", status, text, None

    def _still_failing(self, text: str, cand: Candidate, excused: set[str]) -> list[str]:
        """Rules (but the `excused`: failed and flagged, say) that the fixed text fails. Not the
        embedding rules (semantic_grounding: a call to the embedding model for a text the fixes
        only shortened or masked) nor json_schema (parsed again above)."""
        fixed = Candidate(text, cand.prompt, cand.context, cand.completion_tokens, cand.finish_reason)
        # The fixed text's token count is not known (no generation made it): length's max_tokens,
        # which a truncation cannot repair and `fix` is allowed beside, is not checked again.
        untimed = Candidate(text, cand.prompt, cand.context, 0, cand.finish_reason)
        out = []
        for rule in self.rules:
            if rule.name in excused or isinstance(rule, (SemanticGrounding, JsonSchema)):
                continue
            try:
                if not rule.check(untimed if isinstance(rule, Length) else fixed).passed:
                    out.append(rule.name)
            except Exception as e:  # noqa: BLE001 - a custom rule that raises on the fixed text: not passed
                out.append(f"{rule.name} (raised {type(e).__name__})")
        return out

    def _repair_prompt(self, cand: Candidate, failed, attempt: int, source: str) -> str | RepairFailed:
        """The retry's prompt, from the row's first prompt (`source`); or RepairFailed (its words
        name the error's type, never a value) when the template raises on this row (before stop
        44 that stopped the batch and the job)."""
        try:
            return self.repair_template.render(
                prompt=source, output=cand.output, violations=_violations(failed), attempt=attempt + 1
            )
        except Exception as e:  # noqa: BLE001 - the template is the spec's: its failure is this row's
            return RepairFailed(f"prompt.repair_template raised {type(e).__name__}")


class RepairFailed(str):
    """Why a row's repair prompt could not be made (Validator._repair_prompt)."""


def _violations(failed) -> str:
    return "; ".join(f"{rule.name}: {res.message}" if res.message else rule.name for rule, res in failed)


def rule_results_column(by_rule: list[list[RuleResult]], n: int) -> pa.Array:
    """RULE_RESULTS_TYPE for n rows from each rule's results, built column by column (no per-row
    dicts: measured ~4 us a row less than pa.array over lists of dicts)."""
    k = len(by_rule)
    flat = [results[i] for i in range(n) for results in by_rule]  # row-major: row 0's rules, row 1's, ...
    item = RULE_RESULTS_TYPE.value_type
    structs = pa.StructArray.from_arrays(
        [pa.array([r.rule for r in flat], pa.string()), pa.array([r.passed for r in flat], pa.bool_()),
         pa.array([r.score for r in flat], pa.float64()), pa.array([r.message for r in flat], pa.string())],
        fields=list(item),
    )  # fmt: skip
    offsets = pa.array(range(0, n * k + 1, k) if k else [0] * (n + 1), pa.int32())
    return pa.ListArray.from_arrays(offsets, structs, type=RULE_RESULTS_TYPE)


def _retry_requests(requests: pa.Table, rows: list[int], prompts: list[str]) -> pa.Table:
    """REQUEST_SCHEMA rows of the retries; an online chat's also keep `messages` (the chat with its
    last user message replaced by the repair prompt: the system prompt and history stay, which a
    retry dropped before stop 44) and `input_messages` (the chat as first asked, for the rules)."""
    sub = requests.take(pa.array(rows, pa.int64()))
    first = [f if f is not None else p for f, p in zip(sub.column("first_prompt").to_pylist(), sub.column("prompt").to_pylist())]
    attempts = [(a or 1) + 1 for a in sub.column("attempt").to_pylist()]
    cols = {name: sub.column(name) for name in REQUEST_SCHEMA.names}
    cols["prompt"] = pa.array(prompts, pa.string())
    cols["first_prompt"] = pa.array(first, pa.string())
    cols["attempt"] = pa.array(attempts, pa.int32())
    out = pa.table(cols, schema=REQUEST_SCHEMA)
    chats = _column(sub, "messages")
    if chats:
        asked = _column(sub, "input_messages") or chats
        out = out.append_column("messages", pa.array([_with_last_user(m, p) for m, p in zip(chats, prompts)], pa.string()))
        out = out.append_column("input_messages", pa.array(asked, pa.string()))
    return out


def _column(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _chat_text(messages_json: str) -> str:
    return "\n".join(m.get("content") or "" for m in json.loads(messages_json))


def _with_last_user(messages_json: str | None, prompt: str) -> str | None:
    if messages_json is None:
        return None
    messages = json.loads(messages_json)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        messages.append({"role": "user", "content": prompt})
    else:
        messages[last] = {"role": "user", "content": prompt}
    return json.dumps(messages)


# -- construction ----------------------------------------------------------------------------------


# Rule kinds whose class takes only its spec.
def check_offline(spec: JobSpec) -> list:
    """What `tidegate check` can verify without running any code the spec names: a JSON Schema
    given inline, every built-in rule's settings, and the trust policy's verdict on each import
    path (schemas/trusted_code.py). Returns the verdicts; raises SpecError for a bad rule or schema."""
    from schemas.trusted_code import judge

    inline = OutputSchema(spec.output.schema_) if isinstance(spec.output.schema_, dict) else None
    for i, s in enumerate(spec.rules):
        if s.rule in _PLAIN_RULES:
            _PLAIN_RULES[s.rule](s)
        elif s.rule == "json_schema" and inline is not None:
            JsonSchema(s, inline)
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
    try:
        env.from_string(spec.prompt.repair_template)
    except Exception as e:  # noqa: BLE001 - the template's syntax error, by class and line
        raise SpecError(f"prompt.repair_template: {type(e).__name__} at line {getattr(e, 'lineno', '?')}") from None
    return [judge(ref, spec.allowed_modules) for ref in spec.code_refs()]


_PLAIN_RULES: dict[str, type[Rule]] = {
    "length": Length, "regex": Regex, "deny_list": DenyList, "refusal": Refusal,
    "pii_leakage": PiiLeakage, "grounding": Grounding,
}  # fmt: skip


def build_rules(specs: list, output_schema: OutputSchema | None, embedder=None,
                allowed_modules: list[str] | None = None) -> list[Rule]:  # fmt: skip
    """Rule objects for the job's rule specs (JobSpec.rules), in order."""
    rules: list[Rule] = []
    for i, s in enumerate(specs):
        kind = s.rule
        if kind in _PLAIN_RULES:
            rules.append(_PLAIN_RULES[kind](s))
        elif kind == "json_schema":
            assert output_schema is not None  # JobSpec checks output.schema is set
            rules.append(JsonSchema(s, output_schema))
        elif kind == "semantic_grounding":
            rules.append(SemanticGrounding(s, embedder))
        elif kind == "custom":
            rules.append(Custom(s, f"validation.{i}", allowed_modules))
        else:  # pragma: no cover - the spec's discriminated union lists every kind
            raise SpecError(f"validation.{i}: unknown rule {kind!r}")
    return rules
