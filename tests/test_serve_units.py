"""Pure parts of the online endpoint: per-tenant budgets (compute/limits.py) and API keys
(crypto/api_keys.py, stored hashed in the keyring)."""

from __future__ import annotations

import os
import secrets
import uuid

import pytest

from tests.conftest import REPO


def test_limits_are_token_buckets():
    from compute.limits import TenantLimits
    from schemas.errors import LimitExceededError
    from schemas.spec import ServeLimitsSpec

    now = [0.0]
    lim = TenantLimits(ServeLimitsSpec(requests_per_minute=2, tokens_per_minute=100), clock=lambda: now[0])
    lim.admit("a", 10)
    lim.admit("a", 10)
    with pytest.raises(LimitExceededError) as e:
        lim.admit("a", 10)
    assert e.value.retry_after_s == pytest.approx(30.0)
    lim.admit("b", 10)  # per tenant
    now[0] = 30.0
    lim.admit("a", 10)
    lim.spend("a", 150)
    now[0] = 60.0
    with pytest.raises(LimitExceededError, match="token budget"):
        lim.admit("a", 10)


def test_api_keys_are_stored_hashed(tmp_path):
    from crypto.api_keys import ApiKeyVerifier, parse_token
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from schemas.errors import AuthError

    kr = Keyring.init(tmp_path / "k.json", LocalMasterKeyProvider(key=secrets.token_bytes(32)))
    key_id, token = kr.create_api_key("acme")
    text = (tmp_path / "k.json").read_text()
    # The whole secret, as the verifier reads it: base64url, so it may itself hold "_" (the last
    # "_"-piece of a token was 1-2 characters in ~1 % of tokens, and found in the file by chance).
    parsed_id, secret = parse_token(token)
    assert parsed_id == key_id and len(secret) == 43
    assert token not in text and secret not in text and key_id in text
    # docs/serving.md: scrypt, n=2^14, r=8, p=1, a 16-byte salt of its own per key (computed here
    # with the cryptography package, independently of crypto/api_keys.py).
    import base64
    import json

    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    record = json.loads(text)["api_keys"][key_id]
    assert (record["n"], record["r"], record["p"]) == (2**14, 8, 1)
    salt = base64.b64decode(record["salt"])
    assert len(salt) == 16
    assert base64.b64decode(record["hash"]) == Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(secret.encode())
    other_id, _ = kr.create_api_key("acme")
    assert json.loads((tmp_path / "k.json").read_text())["api_keys"][other_id]["salt"] != record["salt"]
    v = ApiKeyVerifier(Keyring.open(tmp_path / "k.json"))
    assert v.verify(token).tenant == "acme"
    with pytest.raises(AuthError):
        v.verify(token[:-1] + ("A" if token[-1] != "A" else "B"))
    kr.revoke_api_keys("acme")
    with pytest.raises(AuthError):
        v.verify(token)


def test_a_verified_key_stays_verified_through_keyring_writes_that_leave_it_alone(tmp_path, monkeypatch):
    """The encryption's usage counters and its rotations rewrite a keyring the API keys share;
    a verified token is checked again (an scrypt on the request's path) only when its own key's
    record changed. Revocation still takes effect at the next request."""
    import crypto.api_keys as api_keys
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from schemas.errors import AuthError

    kr = Keyring.init(tmp_path / "k.json", LocalMasterKeyProvider(key=secrets.token_bytes(32)))
    kr.create_tenant("acme")
    _, acme = kr.create_api_key("acme")
    _, globex = kr.create_api_key("globex")
    derivations = []  # scrypt runs of the verifier
    real = api_keys.verify_record
    monkeypatch.setattr(api_keys, "verify_record", lambda *a: derivations.append(1) or real(*a))
    v = api_keys.ApiKeyVerifier(Keyring.open(tmp_path / "k.json"))
    assert (v.verify(acme).tenant, v.verify(globex).tenant) == ("acme", "globex")
    assert len(derivations) == 2
    kr.record_usage({("acme", 1): 5})  # what a replica's encryption writes every few seconds
    kr.rotate("acme")
    _, later = kr.create_api_key("acme")  # another key: the two verified ones are unchanged
    assert (v.verify(acme).tenant, v.verify(globex).tenant) == ("acme", "globex")
    assert len(derivations) == 2
    kr.revoke_api_keys("acme")  # both of acme's keys
    with pytest.raises(AuthError):
        v.verify(acme)
    with pytest.raises(AuthError):
        v.verify(later)
    assert v.verify(globex).tenant == "globex" and len(derivations) == 2
    kr.revoke_api_keys("globex")
    with pytest.raises(AuthError):
        v.verify(globex)


def test_an_api_key_check_leaves_the_event_loop_free(tmp_path, monkeypatch):
    """A key's first request (an scrypt, ~50-70 ms of CPU) runs its check in a worker thread: the
    replica's event loop goes on serving meanwhile. With the check on the loop (verify) the ticker
    below would not tick at all until it returned. A wrong secret and a key revoked while its
    check ran are refused, and a checked key is remembered (no second scrypt)."""
    import asyncio
    import time

    import crypto.api_keys as api_keys
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from schemas.errors import AuthError

    kr = Keyring.init(tmp_path / "k.json", LocalMasterKeyProvider(key=secrets.token_bytes(32)))
    _, acme = kr.create_api_key("acme")
    _, globex = kr.create_api_key("globex")
    derivations = []
    real = api_keys.verify_record
    monkeypatch.setattr(api_keys, "verify_record", lambda *a: derivations.append(1) or real(*a))
    v = api_keys.ApiKeyVerifier(Keyring.open(tmp_path / "k.json"))

    async def ticks_during(check) -> tuple[int, object]:
        ticks, done = 0, False

        async def ticker():
            nonlocal ticks
            while not done:
                await asyncio.sleep(0.002)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        try:
            got = await check
        except AuthError as e:
            got = e
        done = True
        await t
        return ticks, got

    async def scenario():
        t0 = time.perf_counter()
        ticks, got = await ticks_during(v.verify_async(acme))
        took = time.perf_counter() - t0
        assert got.tenant == "acme" and len(derivations) == 1
        # ~one tick per 2 ms while the check ran (tens of them); none if it held the loop
        assert ticks >= 3, (ticks, took)
        ticks, got = await ticks_during(v.verify_async(acme))  # remembered: no scrypt
        assert got.tenant == "acme" and len(derivations) == 1
        _, got = await ticks_during(v.verify_async(globex[:-1] + ("A" if globex[-1] != "A" else "B")))
        assert isinstance(got, AuthError) and len(derivations) == 2
        # Revoked while its check is in the thread: refused, not remembered.
        def slow_check(*a):
            derivations.append(1)
            ok = real(*a)
            kr.revoke_api_keys("globex")
            return ok

        monkeypatch.setattr(api_keys, "verify_record", slow_check)
        _, got = await ticks_during(v.verify_async(globex))
        assert isinstance(got, AuthError), got
        with pytest.raises(AuthError):
            v.verify(globex)

    asyncio.run(scenario())


def test_the_example_serve_spec_parses_and_sizes_the_deployment():
    from pathlib import Path

    from jobs.serve import build_app
    from schemas.errors import SpecError
    from schemas.spec import load_spec, parse_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "serve.yaml")
    assert spec.serve.max_replicas == 2 and spec.serve.ack == "durable" and spec.serve.auth
    deployment = build_app(spec)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 2
    assert deployment._deployment_config.max_queued_requests == 128
    # --master-key-file: the replicas are told where their node keeps the key, never the key
    env = build_app(spec, master_key_file="/run/secrets/master-key")._bound_deployment.ray_actor_options["runtime_env"]
    assert env["env_vars"][f"{spec.encryption.master_key_env}_FILE"] == "/run/secrets/master-key"
    assert spec.encryption.master_key_env not in env["env_vars"]
    plain = spec.model_dump(mode="json")
    plain.pop("encryption")
    with pytest.raises(SpecError, match="--master-key-file: the spec encrypts nothing"):
        build_app(parse_spec(plain), master_key_file="/k")
    bad = spec.model_dump(mode="json")
    bad["serve"] = {"min_replicas": 3, "max_replicas": 2}
    with pytest.raises(SpecError, match="min_replicas is above max_replicas"):
        parse_spec(bad)


def test_an_api_key_in_a_log_line_is_masked():
    from crypto.api_keys import new_api_key, parse_token
    from jobs.logs import redact_text

    key_id, token, _ = new_api_key("acme", "2026-12-03T00:00:00Z")
    masked = redact_text(f"a client sent {token} in a query string")
    _, secret = parse_token(token)  # the whole secret: base64url may hold "_" itself
    assert secret not in masked and f"tg_{key_id}_***" in masked


def test_recent_answers_keep_the_first_answer_and_drop_the_oldest_key():
    from compute.idempotency import RecentAnswers

    answers = RecentAnswers(keep=2)
    answers.put(1, (200, {"n": 1}))
    answers.put(1, (500, {"n": "again"}))  # a key's first answer is its answer
    answers.put(2, (200, {"n": 2}))
    answers.put(3, (429, {"n": 3}))
    assert answers.get(1) is None and answers.get(2) == (200, {"n": 2}) and answers.get(3) == (429, {"n": 3})
    assert len(answers) == 2
    none_kept = RecentAnswers(keep=0)
    none_kept.put(1, (200, {}))
    assert none_kept.get(1) is None and len(none_kept) == 0
    with pytest.raises(ValueError, match="keep"):
        RecentAnswers(keep=-1)


def test_the_claims_actor_follows_a_redeploys_idempotency_cache(local_ray):
    """The claims actor outlives a redeploy (detached): the next deployment's
    serve.idempotency_cache applies to it. Before, it kept the size it was created with."""
    import ray

    from actors.idempotency import shared_claims
    from actors.remote import delete_app_actors

    app = f"claims-{uuid.uuid4().hex[:8]}"
    try:
        claims = shared_claims(app, 2)
        for key in (1, 2):
            assert ray.get(claims.claim.remote(key, "a", 30.0, 1.0)) is None
            ray.get(claims.finish.remote(key, "a", (200, {"n": key})))
        assert ray.get(claims.claim.remote(1, "b", 30.0, 1.0)) == (200, {"n": 1})  # kept: the first answer
        claims = shared_claims(app, 0)  # redeployed with idempotency_cache 0
        assert ray.get(claims.claim.remote(2, "b", 30.0, 1.0)) is None  # nothing kept any more: the caller looks in the tables
    finally:
        delete_app_actors(app)


def test_a_renewed_claim_outlives_its_lease_and_a_waiter_is_told_busy_not_given_the_key():
    """Before, a claim lapsed after a fixed lease even while its holder still ran (an audit write it
    had given up acknowledging, which its key waits for): the next request with the key then took
    the claim and ran a second time beside it. A holder now renews its claim, and a waiter waits at
    most its wait_s, then is told BUSY (409)."""
    import asyncio

    from compute.idempotency import AFTER_ANOTHER, BUSY, KeyClaims

    async def scenario():
        # Leases of 1-2 s, renewals every 0.1 s, waits of 0.3-0.5 s: margins of a second or more for
        # a loaded machine's event loop.
        claims = KeyClaims(keep=4)
        assert await claims.claim(7, "first", 1.0, 1.0) is None
        renewed = []

        async def keep():  # the holder, alive: renews its 1 s lease every 0.1 s
            while True:
                await asyncio.sleep(0.1)
                renewed.append(claims.renew(7, "first", 1.0))

        holder = asyncio.ensure_future(keep())
        await asyncio.sleep(1.5)  # past the lease it was given: still the holder's
        assert await claims.claim(7, "second", 1.0, 0.5) == BUSY  # alive past the waiter's wait: not given the key
        assert renewed and all(renewed)
        waiter = asyncio.ensure_future(claims.claim(7, "third", 1.0, 10.0))
        await asyncio.sleep(0.2)
        holder.cancel()
        claims.finish(7, "first", (200, {"n": 1}))
        assert await waiter == (200, {"n": 1})  # the first answer, without running
        # A holder that stops renewing (its replica died) loses the key after its lease.
        assert await claims.claim(8, "dead", 0.5, 1.0) is None
        assert await claims.claim(8, "next", 5.0, 10.0) == AFTER_ANOTHER  # waited, then holds it: look in the tables
        assert not claims.renew(8, "dead", 5.0)  # the dead one's renewal (were it alive) is refused
        claims.finish(8, "dead", None)  # and its late finish does not release the new holder's claim
        assert await claims.claim(8, "third", 5.0, 0.3) == BUSY  # "next" holds it for 5 s

    asyncio.run(scenario())


class _TimedAudit:
    """An audit whose write takes `seconds` (a Delta commit's time) and counts the writes."""

    def __init__(self, seconds: float):
        self.seconds, self.writes, self.rows = seconds, 0, 0

    def write(self, results, dead) -> None:
        import time

        time.sleep(self.seconds)
        self.writes += 1
        self.rows += results.num_rows

    def checkpoint(self) -> dict:
        return {}


def _steady_load(group_commit_s: float, requests: int = 60, every_s: float = 0.01) -> _TimedAudit:
    """`requests` durable adds, one every `every_s`, each awaited by its own task (concurrent requests)."""
    import asyncio

    import pyarrow as pa

    from jobs.serve import _AuditBuffer

    audit = _TimedAudit(0.03)
    buffer = _AuditBuffer(audit, "durable", 1.0, group_commit_s=group_commit_s)
    row = pa.table({"id": ["r"]})

    async def load():
        tasks = []
        for _ in range(requests):
            tasks.append(asyncio.ensure_future(buffer.add(row, row.slice(0, 0))))
            await asyncio.sleep(every_s)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    asyncio.run(load())
    return audit


def test_group_commit_makes_fewer_larger_commits_under_load():
    """serve.group_commit_ms: requests arriving while a commit runs wait a little for more, so a
    loaded replica commits less often; every request still gets its commit."""
    back_to_back = _steady_load(0.0)
    grouped = _steady_load(0.2)
    assert back_to_back.rows == grouped.rows == 60
    assert grouped.writes * 2 <= back_to_back.writes, (grouped.writes, back_to_back.writes)


def test_group_commit_never_holds_a_request_of_an_idle_replica():
    """One request at a time (each awaited before the next): no commit waits for the group commit
    (a 30 s one would time the load out)."""
    import asyncio

    import pyarrow as pa

    from jobs.serve import _AuditBuffer

    audit = _TimedAudit(0.01)
    buffer = _AuditBuffer(audit, "durable", 1.0, group_commit_s=30.0)
    row = pa.table({"id": ["r"]})

    async def one_at_a_time():
        for _ in range(5):
            await buffer.add(row, row.slice(0, 0))

    asyncio.run(asyncio.wait_for(one_at_a_time(), 10))
    assert audit.writes == 5


def test_a_durable_answer_does_not_wait_for_the_checkpoint_its_commit_made_due():
    """The audit's appends leave checkpoints to the buffer (connectors/delta.py defer_checkpoints):
    it writes one after releasing the requests of the group whose commit made it due, before the
    next group's write. The stand-in's checkpoint waits (up to 5 s) for the request to have its
    answer: were it written before the answer, it would record that it had to give up."""
    import asyncio
    import threading

    import pyarrow as pa

    from jobs.serve import _AuditBuffer

    answered = threading.Event()
    order: list[str] = []

    class CheckpointingAudit(_TimedAudit):
        def write(self, results, dead) -> None:
            super().write(results, dead)
            order.append("write")

        def checkpoint(self) -> dict:
            order.append("checkpoint after the answer" if answered.wait(5) else "checkpoint before the answer")
            return {"results": 3}

    audit = CheckpointingAudit(0.0)
    buffer = _AuditBuffer(audit, "durable", 1.0)
    row = pa.table({"id": ["r"]})

    async def requests():
        await buffer.add(row, row.slice(0, 0))
        answered.set()
        await buffer.add(row, row.slice(0, 0))  # its write comes after the first group's checkpoint

    asyncio.run(asyncio.wait_for(requests(), 20))
    assert order[:3] == ["write", "checkpoint after the answer", "write"], order


def test_a_durable_request_waits_for_its_audit_write_at_most_ack_timeout_s():
    """A store that hangs never hangs a request: past ack_timeout_s its wait ends (the endpoint
    answers 503 audit_unavailable, not acknowledged) while the write goes on and still lands."""
    import asyncio

    import pyarrow as pa

    from jobs.serve import AuditAckTimeout, _AuditBuffer

    audit = _TimedAudit(5.0)  # each write takes 5 s (2 s left a stalled machine 1.7 s to miss the timeout)
    buffer = _AuditBuffer(audit, "durable", 1.0, ack_timeout_s=0.3)
    row = pa.table({"id": ["r"]})

    async def request():
        with pytest.raises(AuditAckTimeout) as timed_out:  # before: the wait ended only with the write
            await buffer.add(row, row.slice(0, 0))
        assert audit.writes == 0 and not timed_out.value.write.done()  # the write still runs ...
        await asyncio.wait_for(timed_out.value.write, 30)  # ... and its future says when it ended
        assert audit.writes == 1  # (an Idempotency-Key's retry waits for it: TidegateEndpoint._answer_now)

    asyncio.run(request())
    assert audit.writes == 1 and audit.rows == 1


def test_the_health_check_fails_a_replica_with_a_broken_engine_stuck_guards_or_a_broken_journal():
    """Serve's check_health (a replica that cannot answer any request is replaced): the engine
    failed a step; the guards have run one call (a custom rule's loop) past request_timeout_s +
    60 s; the audit journal cannot take a record again. Otherwise it passes."""
    from pathlib import Path
    from types import SimpleNamespace as NS

    from jobs.serve import GUARDS_STUCK_S, TidegateEndpoint

    check = TidegateEndpoint.func_or_class.check_health

    def replica(broken=None, busy=0.0, journal_broken=None):
        journal = None if journal_broken is None else NS(broken=journal_broken, path=Path("r1.journal"))
        return NS(engine=NS(broken=broken), guards=NS(busy_for=lambda: busy),
                  spec=NS(serve=NS(request_timeout_s=3.0)), buffer=NS(journal=journal))  # fmt: skip

    check(replica())
    check(replica(busy=GUARDS_STUCK_S, journal_broken=False))  # a long call, not past the limit
    with pytest.raises(RuntimeError, match="engine failed a step"):
        check(replica(broken="EngineDeadError"))
    with pytest.raises(RuntimeError, match="guards have run one call"):
        check(replica(busy=GUARDS_STUCK_S + 3.5))
    with pytest.raises(RuntimeError, match="journal r1.journal is unusable"):
        check(replica(journal_broken=True))


def test_a_limiter_that_does_not_answer_is_a_503_not_a_request_that_hangs(monkeypatch):
    """Before, a keyed request awaited the application's limiter with no limit: a limiter actor
    stuck (not dead: a dead one is a RayActorError, answered 503) held the request for good. Now it
    is refused after LIMITER_TIMEOUT_S, and what the limiter may still reserve is given back."""
    import asyncio
    from types import SimpleNamespace as NS

    from jobs.serve import TidegateEndpoint, _Refused

    admit = TidegateEndpoint.func_or_class._admit
    monkeypatch.setitem(admit.__globals__, "LIMITER_TIMEOUT_S", 0.2)  # (Serve's copy of the class has its own)
    refunds = []

    async def request():
        never = asyncio.get_running_loop().create_future()  # an admission the limiter never answers

        async def refund(ref, tenant, tokens):
            refunds.append((ref is never, tenant, tokens))

        replica = NS(_limits=NS(admit=NS(remote=lambda tenant, tokens: never)), _refund_if_admitted=refund)
        with pytest.raises(_Refused) as refused:
            await asyncio.wait_for(admit(replica, NS(tenant="acme"), 40), 5)
        await asyncio.sleep(0)
        return refused.value

    refused = asyncio.run(request())
    assert (refused.code, refused.kind) == (503, "limits_unavailable") and refused.headers == {"Retry-After": "1"}
    assert refunds == [(True, "acme", 40)]


def test_a_duplicate_on_the_same_replica_waits_at_most_the_longest_a_request_takes_then_409():
    """A request whose key's first request still runs on this replica (its audit write outliving
    its answer, say) waited for it with no limit; on another replica it gets 409 after
    _key_wait_s. Now both: 409 idempotency_key_in_use, and its token reservation goes back."""
    import asyncio
    from types import SimpleNamespace as NS

    from compute.idempotency import RecentAnswers
    from compute.online import request_offset
    from jobs.serve import TidegateEndpoint

    refunds = []

    async def request():
        never = asyncio.get_running_loop().create_future()  # the first request, still running
        offset = request_offset("idem", "acme", "invoke", "key-1")
        replica = NS(_answers=RecentAnswers(4), _in_flight={offset: never}, _key_wait_s=lambda: 0.3,
                     _settle=lambda principal, tokens: refunds.append(tokens),
                     _refusal=lambda r, route: (r.code, r.kind, r.headers))  # fmt: skip
        answer = TidegateEndpoint.func_or_class._answer_now
        return await asyncio.wait_for(answer(replica, NS(headers={"idempotency-key": "key-1"}), NS(tenant="acme"),
                                             "invoke", None, None, 40, b"{}", ()), 10)  # fmt: skip

    assert asyncio.run(request()) == (409, "idempotency_key_in_use", {"Retry-After": "5"})
    assert refunds == [-40]


def test_a_key_sent_again_with_another_body_is_refused_422_not_given_the_first_answer():
    """The IETF Idempotency-Key draft: a key reused with another payload is an error (422). Before,
    the second body got the first body's answer, as if it had been run. The same request sent
    again serialised otherwise (keys in another order, other spaces) is the same request: its
    first answer, and so is a chat request sent again with(out) `stream`. A request waiting on the
    key's first request (same replica) is checked when that answer comes. An answer kept by a
    replica before stop 47, or a row stored before it (no fingerprint), is replayed."""
    import asyncio
    import json
    from types import SimpleNamespace as NS

    import pyarrow as pa

    from compute.idempotency import RecentAnswers, request_fingerprint
    from compute.online import request_offset
    from jobs.serve import STREAM_KEYS, TidegateEndpoint

    first = {"id": "ev-1", "question": "how far is the moon", "opts": {"a": 1, "b": [1, 2]}}
    body = json.dumps(first).encode()
    offset = request_offset("idem", "acme", "invoke", "key-1")
    old_offset = request_offset("idem", "acme", "invoke", "key-old")
    answers = RecentAnswers(4)
    answers.put(offset, (200, {"output": "far"}, request_fingerprint("acme", "invoke", "key-1", body)))
    answers.put(old_offset, (200, {"output": "old"}))  # kept by a replica of an earlier version
    refunds, recorded = [], []

    async def send(key: str, payload: bytes, route: str = "invoke", ignore=(), in_flight=None):
        in_flight = {request_offset("idem", "acme", route, key): in_flight} if in_flight else {}
        replica = NS(_answers=answers, _in_flight=in_flight, _key_wait_s=lambda: 0.3,
                     _metrics=NS(record=lambda *a: recorded.append(a[1])), _settle=lambda principal, tokens: refunds.append(tokens),
                     _refusal=lambda r, route: (r.code, r.kind))  # fmt: skip
        answer = TidegateEndpoint.func_or_class._answer_now
        out = await asyncio.wait_for(answer(replica, NS(headers={"idempotency-key": key}), NS(tenant="acme"),
                                            route, None, None, 40, payload, ignore), 10)  # fmt: skip
        return out if isinstance(out, tuple) else (out.status_code, json.loads(out.body), out.headers.get("idempotent-replayed"))

    async def waiting(key: str, payload: bytes):  # the key's first request (body `first`) runs on this replica
        running = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, running.set_result, (200, {"output": "running"},
                                              request_fingerprint("acme", "invoke", key, body)))  # fmt: skip
        return await send(key, payload, in_flight=running)

    changed = json.dumps({**first, "question": "how far is the sun"}).encode()
    assert asyncio.run(send("key-1", changed)) == (422, "idempotency_key_reused")
    reordered = json.dumps(dict(reversed(list(first.items()))), indent=2).encode()
    assert reordered != body
    assert asyncio.run(send("key-1", reordered)) == (200, {"output": "far"}, "true")
    assert asyncio.run(send("key-old", changed)) == (200, {"output": "old"}, "true")
    assert asyncio.run(waiting("key-2", changed)) == (422, "idempotency_key_reused")
    assert asyncio.run(waiting("key-3", reordered)) == (200, {"output": "running"}, "true")
    # chat: the same messages, streamed or not, are the same request; other messages are not
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    answers.put(request_offset("idem", "acme", "chat/completions", "key-4"),
                (200, {"choices": []}, request_fingerprint("acme", "chat/completions", "key-4", json.dumps(chat).encode(), STREAM_KEYS)))
    streamed = json.dumps({**chat, "stream": True, "stream_options": {"include_usage": True}}).encode()
    assert asyncio.run(send("key-4", streamed, "chat/completions", STREAM_KEYS)) == (200, {"choices": []}, "true")
    other = json.dumps({**chat, "messages": [{"role": "user", "content": "bye"}]}).encode()
    assert asyncio.run(send("key-4", other, "chat/completions", STREAM_KEYS)) == (422, "idempotency_key_reused")
    assert refunds == [-40] * 7  # nothing ran: each reservation goes back
    assert recorded == [200, 200, 200, 200]  # the replays (a refusal is recorded by _refusal, stubbed here)

    # A row stored before stop 47 (no column) or without a key (null) has no fingerprint.
    from schemas.records import RESULTS_SCHEMA

    render = TidegateEndpoint.func_or_class._render
    row = {"id": "ev-1", "status": "ok", "attempts": 1, "rule_results": [], "finish_reason": "stop", "output_text": "far",
           "prompt_tokens": 1, "completion_tokens": 1, "source_topic": "serve:invoke", "source_offset": offset}  # fmt: skip
    old_row = pa.Table.from_pylist([row], schema=RESULTS_SCHEMA)
    assert render(NS(model_label="m"), "invoke", old_row, None, None, "f" * 32)[:1] == (200,)
    assert render(NS(model_label="m"), "invoke", old_row, None, None, "f" * 32)[2] is None
    # Two rows at one offset (a lapsed claim let two bodies run): the one of the request's body.
    two = pa.Table.from_pylist([{**row, "output_text": "a", "request_fingerprint": "a" * 32},
                                {**row, "output_text": "b", "request_fingerprint": "b" * 32}])  # fmt: skip
    assert render(NS(model_label="m"), "invoke", two, None, None, "b" * 32)[1]["output"] == "b"
    assert render(NS(model_label="m"), "invoke", two, None, None, "c" * 32)[1]["output"] == "a"


def test_a_request_fingerprint_is_keyed_by_its_idempotency_key():
    """Not an unkeyed hash of the body (one of `{"q": "yes"}` would say what was asked to whoever
    guesses it): keyed by tenant, route and key. The audit stores it encrypted besides
    (test_serve.py::test_idempotency_key_returns_the_first_answer_and_writes_one_row)."""
    import hashlib

    from compute.idempotency import request_fingerprint

    body = b'{"q": "yes"}'
    fp = request_fingerprint("acme", "invoke", "k1", body)
    assert fp == request_fingerprint("acme", "invoke", "k1", b'{ "q":"yes" }') and len(fp) == 32
    others = {request_fingerprint(*parts, body) for parts in
              (("acme", "invoke", "k2"), ("globex", "invoke", "k1"), ("acme", "chat/completions", "k1"))}
    assert fp not in others and len(others) == 3
    canonical = b'{"q":"yes"}'
    assert fp not in {hashlib.sha256(b).hexdigest()[:32] for b in (body, canonical)}
    assert request_fingerprint("acme", "invoke", "k1", b"\xff not json") != request_fingerprint("acme", "invoke", "k1", b"\xfe not json")


def test_an_answer_is_stamped_with_its_rows_time_so_a_replay_is_the_same_answer():
    """`created` came from the clock when the body was rendered: a replay rendered from the tables
    later carried another stamp than the first answer. It is the row's processed_at now."""
    from datetime import datetime, timezone

    from jobs.serve import _ok_body

    made = datetime(2026, 12, 7, 8, 0, 0, 400000, tzinfo=timezone.utc)
    row = {"id": "r1", "status": "ok", "attempts": 1, "rule_results": [], "finish_reason": "stop",
           "output_text": "hi", "output_json": None, "prompt_tokens": 3, "completion_tokens": 1, "processed_at": made}  # fmt: skip
    for route in ("chat/completions", "completions"):
        body = _ok_body(route, "chatcmpl-1", row, "tiny")
        assert body["created"] == int(made.timestamp()) == _ok_body(route, "chatcmpl-1", dict(row), "tiny")["created"]


def test_each_local_haproxy_gets_its_own_stats_and_metrics_ports(monkeypatch):
    """Ray's defaults (8404, 9101) are fixed: a second local endpoint's HAProxy would not start.
    Free ones each time, unless the environment names them; none for the Python proxy."""
    from pathlib import Path

    from jobs.serve import ingress_env
    from schemas.spec import load_spec

    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT", raising=False)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT", raising=False)
    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "serve.yaml")
    env = ingress_env(spec)
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert ingress_env(spec)["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    proxy = ingress_env(spec.model_copy(update={"serve": spec.serve.model_copy(update={"ingress": "proxy"})}))
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in proxy


_INGRESS_PORT_VARS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
                      "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT",
                      "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
                      "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")  # fmt: skip


def _ingress_ports(env: dict) -> set[int]:
    """Every port a local Ray's Serve ingress may listen on with these settings."""
    http = range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]))
    grpc = range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]))
    assert len(http) == len(grpc) == 96 and not set(http) & set(grpc)
    singles = {int(env[v]) for v in _INGRESS_PORT_VARS[4:]}
    assert len(singles) == 4 and not singles & (set(http) | set(grpc))
    return set(http) | set(grpc) | singles


def test_two_local_endpoints_get_ingress_ports_of_their_own(monkeypatch):
    """Ray's Serve ports are the same for every local Ray: the fallback proxy's 8500 (bound with
    SO_REUSEPORT, so a second Ray's shares it and the kernel splits the connections), the replicas'
    30000-31000 and 40000-41000, HAProxy's 8404 and 9101. Each process that starts a local Ray
    claims a block of its own (a lock held for its life); another process gets another block."""
    import json
    import subprocess
    import sys

    from jobs.serve import local_ingress_ports
    from schemas.errors import TidegateError

    for var in _INGRESS_PORT_VARS:
        monkeypatch.delenv(var, raising=False)
    env = local_ingress_ports()
    ours = _ingress_ports(env)
    assert int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) != 8500
    assert min(ours) >= 20000 and max(ours) < 30000  # not Ray's worker ports, not the ephemeral range
    assert local_ingress_ports() == env  # the same block for this process's next local Ray
    child = subprocess.run([sys.executable, "-c", "import json; from jobs.serve import local_ingress_ports; "
                            "print(json.dumps(local_ingress_ports()))"], cwd=REPO, capture_output=True, text=True,
                           check=True, env={k: v for k, v in os.environ.items() if k not in _INGRESS_PORT_VARS})  # fmt: skip
    assert not ours & _ingress_ports(json.loads(child.stdout))
    ranges = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "31000", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "31100",
              "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "41000", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "41100"}  # fmt: skip
    for var, value in {**ranges, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8600"}.items():
        monkeypatch.setenv(var, value)  # the environment's own choices stay
    mine = local_ingress_ports()
    assert {v: mine[v] for v in ranges} == ranges and mine["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "8600"
    assert mine["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] == env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"]
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT")  # Ray would take it from its shared default
    with pytest.raises(TidegateError, match="RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT: set the four"):
        local_ingress_ports()


def test_serve_refuses_a_serve_port_in_use_before_starting_ray(tmp_path, capsys, monkeypatch):
    """Serve's Python proxy binds serve.port with SO_REUSEPORT: a second local endpoint on a port
    the first one holds would share it silently. `tidegate serve` refuses it (exit 2), Ray unstarted."""
    import socket

    import yaml

    from jobs.serve import _port_in_use
    from jobs.serve import main as serve_main
    from tests.conftest import make_spec

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Serve's proxy binds it
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        spec = make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
            "source": {"kafka": {"topic": "t", "bootstrap_servers": ["127.0.0.1:9"]}}, "serve": {"port": port, "auth": False}})  # fmt: skip
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert serve_main(str(path), None, False) == 2
    assert f"serve.port {port} on 127.0.0.1 cannot be listened on (Address already in use)" in capsys.readouterr().out
    assert _port_in_use("127.0.0.1", port) is None  # closed: free again


def test_a_port_block_never_holds_the_spec_serve_port(monkeypatch):
    import jobs.serve as serve_module

    monkeypatch.setattr(serve_module, "_claimed_block", None)
    first = serve_module.claim_port_block()
    assert serve_module.claim_port_block(avoid=first + 196) not in (first, None)  # e.g. the fallback proxy's
    os.close(serve_module._claimed_block[1])  # this test's claim (the process's own is put back)


def test_a_port_block_with_a_port_in_use_is_passed_over(monkeypatch):
    import socket

    import jobs.serve as serve_module

    monkeypatch.setattr(serve_module, "_claimed_block", None)  # as a process that has claimed nothing yet
    with socket.socket() as busy:
        for port in range(25013, 29000, 7):  # some port another program holds; blocks off the 200-port grid
            try:
                busy.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        busy.listen()
        monkeypatch.setattr(serve_module, "PORT_BLOCKS", range(port - 3, port - 3 + 2 * 200, 200))
        first = serve_module.claim_port_block()
    os.close(serve_module._claimed_block[1])
    assert first == port - 3 + 200


def test_admission_reserves_tokens_and_settling_refunds_what_was_not_used():
    """Requests admitted together each take their estimate at admission: the second of two that
    together pass the minute's budget waits, before either has run. A request that used less
    gives the rest back; the bucket never goes above its budget."""
    from compute.limits import TenantLimits
    from schemas.errors import LimitExceededError
    from schemas.spec import ServeLimitsSpec

    lim = TenantLimits(ServeLimitsSpec(tokens_per_minute=100), clock=lambda: 0.0)
    lim.admit("a", 60)
    with pytest.raises(LimitExceededError, match="token budget"):
        lim.admit("a", 60)  # 40 left: the first one's 60 are reserved
    lim.spend("a", 10 - 60)  # it used 10: 50 come back
    lim.admit("a", 60)
    lim.spend("a", -500)  # a refund never lifts the bucket past its budget
    assert lim._tokens["a"].level == 100


def _guards(tmp_path, monkeypatch, **spec_extra):
    import base64

    from compute.lineage import lineage_columns
    from compute.online import OnlineGuards
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from crypto.stage import EncryptionStage
    from schemas.spec import parse_spec
    from tests.serve_engines import EchoEngine

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    Keyring.init(tmp_path / "k.json", LocalMasterKeyProvider()).create_tenant("acme")
    spec = parse_spec({
        "name": "units", "source": {"kafka": {"topic": "t"}}, "model": {"path": str(tmp_path)},
        "prompt": {"template": "{{ q }}", "id_field": "id"}, "sampling": {"max_tokens": 32},
        "sink": {"results": str(tmp_path / "r"), "dead_letter": str(tmp_path / "d")},
        "encryption": {"keyring": str(tmp_path / "k.json"), "tenant": "acme"}, **spec_extra,
    })  # fmt: skip

    class Recording(EchoEngine):
        seen: list = []

        async def complete(self, requests, priority: int = 0):
            self.seen.append(requests)
            return await super().complete(requests, priority)

    engine = Recording(spec.model, spec.sampling)
    enc = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
    return OnlineGuards(spec, "run-1", engine, lineage_columns(spec, "rev"), enc), engine


def test_an_online_events_own_budget_is_capped_at_the_specs_max_tokens(tmp_path, monkeypatch):
    """prompt.max_tokens_field on /invoke: admission reserved sampling.max_tokens for the
    completion, so an event asking for more gets that (below it: its own)."""
    import asyncio
    import json

    guards, engine = _guards(tmp_path, monkeypatch, **{"prompt": {"template": "{{ q }}", "id_field": "id",
                                                                  "max_tokens_field": "budget"}})  # fmt: skip
    for asked, got in ((100000, 32), (5, 5), (None, None)):
        event = {"id": "e", "q": "hello", **({"budget": asked} if asked else {})}
        out = asyncio.run(guards.run(guards.event_source(json.dumps(event).encode(), "invoke", 7)))
        assert out.results.num_rows == 1
        assert engine.seen[-1].column("max_tokens").to_pylist() == [got]


def test_a_rejected_requests_tokens_count_every_attempt(tmp_path, monkeypatch):
    """A rule that retries and then rejects: the request used every attempt's tokens, and that is
    what its tenant's budget is charged, not 0 (an answer of 422 generated them all)."""
    import asyncio
    import json

    guards, engine = _guards(tmp_path, monkeypatch, validation=[
        {"rule": "deny_list", "phrases": ["forbidden"], "on_fail": "retry", "max_attempts": 3}])  # fmt: skip
    out = asyncio.run(guards.run(guards.event_source(json.dumps({"id": "e", "q": "forbidden words"}).encode(), "invoke", 9)))
    assert out.results.num_rows == 0 and out.dead.num_rows == 1 and len(engine.seen) == 3
    used = sum(len(p.split()) * 2 for r in engine.seen for p in r.column("prompt").to_pylist())  # EchoEngine's counts
    assert out.tokens() == used > 0


def test_a_cancelled_handler_leaves_its_request_running_to_its_stored_answer():
    """Serve cancels a handler whose client disconnects. The request's run-and-store is shielded:
    it finishes (its row stored, the key's waiters answered) whatever happens to the handler, or
    a row could be written while the key's other requests, told it failed, ran it again."""
    import asyncio

    from jobs.serve import TidegateEndpoint

    endpoint_cls = getattr(TidegateEndpoint, "func_or_class", TidegateEndpoint)
    finished = []

    class Stub:
        async def _answer_now(self, request, principal, route, work, request_id, estimate, payload, parse_payload):
            await asyncio.sleep(0.2)  # generating, then storing
            finished.append(route)
            return "answer"

    async def scenario():
        handler = asyncio.ensure_future(endpoint_cls._answer(Stub(), None, None, "invoke", None))
        await asyncio.sleep(0.05)
        handler.cancel()  # the client left
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert finished == ["invoke"]
