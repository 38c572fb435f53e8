"""Rollout state in the store: the rules of every change, refused changes leaving no trace,
precedence, the promote ladder, kill, the guardrail's rollback, and migration 0004."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, event, func, insert, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dynasorctl.calibration.policyfile import dump_policy_file
from dynasorctl.calibration.store_source import save_policy
from proxy.control import rollout
from proxy.control.rollout import RolloutError, RolloutState, ScopeState, resolve
from proxy.core.policy import CotPolicy, PolicyFile, ScPolicy, parse_policy_file
from proxy.store import db
from proxy.store.models import PolicyRow, RequestRow, RolloutAuditRow, RolloutScopeRow
from proxy.store.recorder import write_records
from tests.unit.test_store import _record

WHO = "alice"


@pytest.fixture()
def engine(store_url: str) -> Engine:
    return db.open_store(store_url)


def add_policy(engine: Engine, model: str = "*", kind: str = "cot", window: int = 3) -> int:
    """A policy stored as calibrate stores it; returns its id."""
    body = {"cot": CotPolicy(window=window)} if kind == "cot" else {"sc": ScPolicy()}
    version = save_policy(engine, kind, model, dump_policy_file(PolicyFile(kind=kind, model=model,
                                                                           **body)), "test")
    with Session(engine) as s:
        return s.scalar(select(PolicyRow.id).where(PolicyRow.kind == kind, PolicyRow.model == model,
                                                   PolicyRow.version == version))


def active(engine: Engine) -> dict[int, bool]:
    with Session(engine) as s:
        return {pid: bool(on) for pid, on in s.execute(select(PolicyRow.id, PolicyRow.active))}


def snapshot(engine: Engine) -> tuple:
    """Everything a change may touch: scopes, audit, policies' active flags."""
    return (rollout.load_state(engine), rollout.history(engine, 1000), active(engine))


def fields(s: ScopeState) -> tuple:
    return (s.mode, s.percent, s.policy_id)


def audit(engine: Engine) -> list[tuple]:
    """The audit trail, oldest first, as (scope, field, previous, new, reason, who)."""
    return [(e.scope, e.field, e.previous, e.new, e.reason, e.who)
            for e in reversed(rollout.history(engine, 1000))]


# --- reading ----------------------------------------------------------------------------------


def test_an_empty_store_has_no_state_so_proxies_follow_their_flags(engine: Engine) -> None:
    state = rollout.load_state(engine)
    assert state == RolloutState({}, 0)
    assert resolve(state, "m", "k") is None
    assert rollout.history(engine) == []


def test_load_state_takes_two_queries(engine: Engine) -> None:
    pid = add_policy(engine)
    for scope in ("*", "model:a", "model:b", "key:k"):
        rollout.set_scope(engine, scope, mode="shadow", policy=pid, reason="r", who=WHO)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    state = rollout.load_state(engine)
    assert len(state.scopes) == 4
    assert len([s for s in statements if not s.startswith("PRAGMA")]) == 2


def test_the_state_carries_the_policy_file_for_the_proxy(engine: Engine) -> None:
    pid = add_policy(engine, window=7)
    rollout.set_scope(engine, "*", mode="shadow", policy=pid, reason="try it", who=WHO)
    s = rollout.load_state(engine).scopes["*"]
    assert (s.scope, s.mode, s.percent, s.policy_id) == ("*", "shadow", 0.0, pid)
    assert (s.policy_version, s.policy_model) == (1, "*")
    assert (s.updated_by, s.reason) == (WHO, "try it")
    assert s.updated_at.tzinfo is not None
    assert abs((datetime.now(UTC) - s.updated_at).total_seconds()) < 60
    parsed = parse_policy_file(s.policy_toml or "", "stored")
    assert parsed.cot is not None and parsed.cot.window == 7


def test_resolve_takes_the_most_specific_scope(engine: Engine) -> None:
    rollout.set_scope(engine, "*", mode="observe", reason="r", who=WHO)
    rollout.set_scope(engine, "model:a", mode="off", reason="r", who=WHO)
    rollout.set_scope(engine, "key:k", percent=50, reason="r", who=WHO)
    state = rollout.load_state(engine)

    def scope(model: str | None, key: str | None) -> str | None:
        found = resolve(state, model, key)
        return None if found is None else found.scope

    assert scope("a", "k") == "key:k"  # key beats model
    assert scope("b", "k") == "key:k"
    assert scope("a", "other") == "model:a"  # model beats "*"
    assert scope("a", None) == "model:a"
    assert scope("b", "other") == "*"
    assert scope(None, None) == "*"
    assert scope("", "") == "*"  # no model or key name: not a scope named "model:"


def test_resolve_without_a_star_scope_leaves_the_rest_to_flags(engine: Engine) -> None:
    rollout.set_scope(engine, "model:a", mode="observe", reason="r", who=WHO)
    state = rollout.load_state(engine)
    assert resolve(state, "a", None) is not None
    assert resolve(state, "b", "k") is None


def test_every_change_moves_the_version_and_no_op_does_not(engine: Engine) -> None:
    pid = add_policy(engine)
    versions = [rollout.load_state(engine).version]
    rollout.set_scope(engine, "*", mode="shadow", policy=pid, reason="r", who=WHO)
    versions.append(rollout.load_state(engine).version)
    rollout.promote(engine, "*", reason="r", who=WHO)
    versions.append(rollout.load_state(engine).version)
    assert versions[0] < versions[1] < versions[2]
    assert versions[-1] == rollout.history(engine, 1)[0].id
    before = snapshot(engine)
    state = rollout.set_scope(engine, "*", mode="enforce", percent=1, policy=pid, reason="again",
                              who="bob")
    assert snapshot(engine) == before  # nothing changed: nothing written, same version
    assert (state.reason, state.updated_by) == ("r", WHO)


# --- set_scope --------------------------------------------------------------------------------


def test_a_new_scope_starts_in_observe_at_0_without_a_policy(engine: Engine) -> None:
    s = rollout.set_scope(engine, "model:a", reason="watch a", who=WHO)
    assert fields(s) == ("observe", 0.0, None)
    assert audit(engine) == [("model:a", "mode", None, "observe", "watch a", WHO),
                             ("model:a", "percent", None, "0", "watch a", WHO)]


def test_set_changes_only_what_is_given_and_audits_each_field(engine: Engine) -> None:
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="enforce", percent=5, policy=pid, reason="start",
                      who=WHO)
    s = rollout.set_scope(engine, "*", percent=12.5, reason="a bit more", who="bob")
    assert fields(s) == ("enforce", 12.5, pid)
    s = rollout.set_scope(engine, "*", mode="shadow", reason="look first", who="carol")
    assert fields(s) == ("shadow", 12.5, pid)
    assert audit(engine) == [
        ("*", "mode", None, "enforce", "start", WHO),
        ("*", "percent", None, "5", "start", WHO),
        ("*", "policy", None, str(pid), "start", WHO),
        ("*", "percent", "5", "12.5", "a bit more", "bob"),
        ("*", "mode", "enforce", "shadow", "look first", "carol"),
    ]
    assert (s.updated_by, s.reason) == ("carol", "look first")


def test_reason_and_who_are_kept_trimmed(engine: Engine) -> None:
    s = rollout.set_scope(engine, "*", reason="  because  ", who=" bob ")
    assert (s.reason, s.updated_by) == ("because", "bob")


def test_the_chosen_policy_is_marked_active_and_a_dropped_one_inactive(engine: Engine) -> None:
    p1, p2, p3 = add_policy(engine), add_policy(engine), add_policy(engine)
    assert active(engine) == {p1: False, p2: False, p3: False}
    rollout.set_scope(engine, "*", mode="shadow", policy=p1, reason="r", who=WHO)
    rollout.set_scope(engine, "key:k", mode="shadow", policy=p1, reason="r", who=WHO)
    assert active(engine) == {p1: True, p2: False, p3: False}
    rollout.set_scope(engine, "*", policy=p2, reason="r", who=WHO)
    assert active(engine) == {p1: True, p2: True, p3: False}  # key:k still rolls p1 out
    rollout.set_scope(engine, "key:k", policy=p2, reason="r", who=WHO)
    assert active(engine) == {p1: False, p2: True, p3: False}


def test_latest_is_the_newest_policy_of_the_scopes_model_else_for_every_model(
        engine: Engine) -> None:
    star1, star2 = add_policy(engine), add_policy(engine)
    a1 = add_policy(engine, model="a")
    a2 = add_policy(engine, model="a")
    sc_b = add_policy(engine, model="b", kind="sc")  # a self-consistency policy: "latest-sc" only
    star3 = add_policy(engine)  # newer than a's, but a's own policies come first
    assert star1 < star2 < a1 < a2 < star3
    assert rollout.set_scope(engine, "model:a", policy="latest", reason="r",
                             who=WHO).policy_id == a2
    assert rollout.set_scope(engine, "model:b", policy="LATEST", reason="r",
                             who=WHO).policy_id == star3
    assert rollout.set_scope(engine, "*", policy="latest", reason="r", who=WHO).policy_id == star3
    assert rollout.set_scope(engine, "key:k", policy="latest", reason="r",
                             who=WHO).policy_id == star3
    assert rollout.set_scope(engine, "model:b", policy="latest-sc", reason="r",
                             who=WHO).policy_id == sc_b
    with pytest.raises(RolloutError, match=r"no self-consistency \(sc\) policy for model 'a'"):
        rollout.set_scope(engine, "model:a", policy="latest-sc", reason="r", who=WHO)


def test_a_policy_id_may_be_given_as_text(engine: Engine) -> None:
    pid = add_policy(engine)
    assert rollout.set_scope(engine, "*", policy=f" {pid} ", reason="r", who=WHO).policy_id == pid


def test_a_models_policy_is_allowed_at_its_model_scope_only(engine: Engine) -> None:
    a = add_policy(engine, model="a")
    assert rollout.set_scope(engine, "model:a", mode="shadow", policy=a, reason="r",
                             who=WHO).policy_id == a
    for scope in ("model:b", "*", "key:k"):
        with pytest.raises(RolloutError, match="is for model 'a' only"):
            rollout.set_scope(engine, scope, mode="shadow", policy=a, reason="r", who=WHO)


def test_percent_is_kept_outside_enforce_and_bounds_are_inclusive(engine: Engine) -> None:
    assert rollout.set_scope(engine, "*", percent=0, reason="r", who=WHO).percent == 0
    assert rollout.set_scope(engine, "*", percent=100, reason="r", who=WHO).percent == 100
    assert rollout.load_state(engine).scopes["*"].mode == "observe"


@pytest.mark.parametrize("scope", ["model:a:b", "model:Qwen/Qwen3-8B", "key:0123456789ab",
                                   "model:" + "x" * 200])
def test_scope_names_may_hold_any_printable_characters(engine: Engine, scope: str) -> None:
    assert rollout.set_scope(engine, scope, reason="r", who=WHO).scope == scope


def _refusals(engine: Engine) -> dict[str, tuple[dict, str]]:
    cot = add_policy(engine)
    other = add_policy(engine, model="other")
    return {
        "empty scope": ({"scope": ""}, "scope must be"),
        "bare name": ({"scope": "a"}, "scope must be"),
        "unknown kind": ({"scope": "user:a"}, "scope must be"),
        "capital kind": ({"scope": "Model:a"}, "scope must be"),
        "no name": ({"scope": "model:"}, "name must be"),
        "padded name": ({"scope": "model: a"}, "name must be"),
        "control char": ({"scope": "key:a\nb"}, "name must be"),
        "long name": ({"scope": "model:" + "x" * 201}, "name must be"),
        "unknown mode": ({"mode": "fast"}, "unknown mode 'fast'"),
        "mode case": ({"mode": "Enforce"}, "unknown mode"),
        "percent 150": ({"percent": 150}, "from 0 to 100, not 150"),
        "negative percent": ({"percent": -0.5}, "from 0 to 100"),
        "nan percent": ({"percent": float("nan")}, "from 0 to 100"),
        "inf percent": ({"percent": float("inf")}, "from 0 to 100"),
        "bool percent": ({"percent": True}, "must be a number"),
        "text percent": ({"percent": "5"}, "must be a number"),
        "shadow without policy": ({"mode": "shadow"}, "shadow needs a policy"),
        "enforce without policy": ({"mode": "enforce", "percent": 5},
                                   "enforce needs a policy"),
        "unknown policy id": ({"policy": 999}, "no policy 999 in the store"),
        "unknown policy text id": ({"policy": "999"}, "no policy 999 in the store"),
        "policy not an id": ({"policy": "newest"}, 'policy id, "latest" or "latest-sc"'),
        "negative policy id": ({"policy": "-1"}, 'policy id, "latest" or "latest-sc"'),
        "bool policy": ({"policy": True}, 'policy id, "latest" or "latest-sc"'),
        "other model's policy": ({"mode": "shadow", "policy": other}, "for model 'other' only"),
        "blank reason": ({"reason": "  "}, "a reason is required"),
        "blank who": ({"who": ""}, "who made the change is required"),
        "good policy, bad mode": ({"mode": "enforc", "policy": cot}, "unknown mode"),
    }


def test_refused_changes_leave_state_audit_and_policies_untouched(engine: Engine) -> None:
    cases = _refusals(engine)
    rollout.set_scope(engine, "*", mode="observe", percent=5, reason="r", who=WHO)
    before = snapshot(engine)
    for name, (change, message) in cases.items():
        kwargs = {"scope": "*", "reason": "r", "who": WHO, **change}
        with pytest.raises(RolloutError, match=message):
            rollout.set_scope(engine, kwargs.pop("scope"), **kwargs)
        assert snapshot(engine) == before, name


def test_a_self_consistency_policy_can_be_rolled_out(engine: Engine) -> None:
    sc = add_policy(engine, kind="sc")
    state = rollout.set_scope(engine, "*", mode="enforce", percent=10, policy=sc, reason="r", who=WHO)
    assert (state.mode, state.percent, state.policy_id) == ("enforce", 10, sc)


def test_latest_without_any_suitable_policy_is_refused(engine: Engine) -> None:
    add_policy(engine, model="a")
    before = snapshot(engine)
    with pytest.raises(RolloutError, match=r"no chain-of-thought \(cot\) policy for every model"):
        rollout.set_scope(engine, "*", mode="shadow", policy="latest", reason="r", who=WHO)
    with pytest.raises(RolloutError, match="for model 'b' or for every model"):
        rollout.set_scope(engine, "model:b", policy="latest", reason="r", who=WHO)
    assert snapshot(engine) == before


def test_an_unreadable_stored_policy_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow).values(kind="cot", model="*", version=1,
                                              policy_toml="version = 1\nkind = 'cot'\n",
                                              source="hand", created_at=datetime.now(UTC)))
    before = snapshot(engine)
    with pytest.raises(RolloutError, match="policy 1: file: .*cannot be rolled out"):
        rollout.set_scope(engine, "*", mode="shadow", policy=1, reason="r", who=WHO)
    assert snapshot(engine) == before


def test_a_failed_audit_write_undoes_the_scope_change(engine: Engine) -> None:
    p1, p2 = add_policy(engine), add_policy(engine)
    rollout.set_scope(engine, "*", mode="enforce", percent=5, policy=p1, reason="r", who=WHO)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text("CREATE TRIGGER no_audit BEFORE INSERT ON rollout_audit "
                              "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"))
        else:
            conn.execute(text("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                              "RAISE EXCEPTION 'audit refused'; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER no_audit BEFORE INSERT ON rollout_audit "
                              "FOR EACH ROW EXECUTE FUNCTION refuse()"))
    before = snapshot(engine)
    changes = {
        "update": lambda: rollout.set_scope(engine, "*", percent=50, policy=p2, reason="r",
                                            who=WHO),
        "insert": lambda: rollout.set_scope(engine, "model:a", reason="r", who=WHO),
        "promote": lambda: rollout.promote(engine, "*", reason="r", who=WHO),
        "kill": lambda: rollout.kill(engine, reason="r", who=WHO),
        "rollback": lambda: rollout.rollback(engine, "*", reason="r"),
    }
    for name, change in changes.items():
        with pytest.raises(SQLAlchemyError, match="audit refused"):
            change()
        assert snapshot(engine) == before, name


def test_the_store_itself_refuses_impossible_rows(engine: Engine) -> None:
    now = datetime.now(UTC)
    row = {"scope": "*", "mode": "observe", "percent": 0.0, "policy_id": None, "updated_at": now,
           "updated_by": WHO, "reason": "r"}
    for bad, match in (({"mode": "fast"}, "ck_rollout_scopes_mode"),
                       ({"percent": 101.0}, "ck_rollout_scopes_percent"),
                       ({"policy_id": 42}, "(?i)foreign key")):
        with pytest.raises(SQLAlchemyError, match=match), engine.begin() as conn:
            conn.execute(insert(RolloutScopeRow).values(**{**row, **bad}))


# --- promote ----------------------------------------------------------------------------------


def test_promote_climbs_the_ladder_then_stops_at_100(engine: Engine) -> None:
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="observe", policy=pid, reason="r", who=WHO)
    seen = [rollout.promote(engine, "*", reason=f"step {i}", who=WHO) for i in range(6)]
    assert [(s.mode, s.percent) for s in seen] == [("enforce", p)
                                                   for p in (1, 5, 10, 25, 50, 100)]
    before = snapshot(engine)
    with pytest.raises(RolloutError, match=r"scope '\*' is already at 100%"):
        rollout.promote(engine, "*", reason="more", who=WHO)
    assert snapshot(engine) == before
    assert [(f, new) for _, f, _, new, _, _ in audit(engine) if f != "policy"] == [
        ("mode", "observe"), ("percent", "0"), ("mode", "enforce"), ("percent", "1"),
        ("percent", "5"), ("percent", "10"), ("percent", "25"), ("percent", "50"),
        ("percent", "100")]


@pytest.mark.parametrize(("start", "expected"), [
    ({"mode": "observe", "percent": 30}, ("enforce", 1.0)),
    ({"mode": "shadow", "percent": 0}, ("enforce", 1.0)),
    ({"mode": "off"}, ("enforce", 1.0)),
    ({"mode": "enforce", "percent": 0}, ("enforce", 1.0)),
    ({"mode": "enforce", "percent": 1}, ("enforce", 5.0)),
    ({"mode": "enforce", "percent": 7}, ("enforce", 10.0)),  # off the ladder: the next step up
    ({"mode": "enforce", "percent": 99.5}, ("enforce", 100.0)),
])
def test_promote_takes_the_next_step(engine: Engine, start: dict, expected: tuple) -> None:
    pid = add_policy(engine)
    rollout.set_scope(engine, "model:a", policy=pid, reason="r", who=WHO, **start)
    s = rollout.promote(engine, "model:a", reason="up", who=WHO)
    assert (s.mode, s.percent) == expected
    assert (s.reason, s.policy_id) == ("up", pid)


def test_promote_without_a_policy_or_scope_is_refused(engine: Engine) -> None:
    rollout.set_scope(engine, "*", mode="observe", reason="r", who=WHO)
    before = snapshot(engine)
    with pytest.raises(RolloutError, match="enforce needs a policy"):
        rollout.promote(engine, "*", reason="r", who=WHO)
    with pytest.raises(RolloutError, match="enforce needs a policy"):
        rollout.promote(engine, "model:never-set", reason="r", who=WHO)
    with pytest.raises(RolloutError, match="a reason is required"):
        rollout.promote(engine, "*", reason="", who=WHO)
    with pytest.raises(RolloutError, match="scope must be"):
        rollout.promote(engine, "everything", reason="r", who=WHO)
    assert snapshot(engine) == before


# --- kill -------------------------------------------------------------------------------------


def test_kill_puts_every_shadowed_or_enforced_scope_back_to_observe(engine: Engine) -> None:
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="enforce", percent=25, policy=pid, reason="r", who=WHO)
    rollout.set_scope(engine, "model:a", mode="shadow", policy=pid, reason="r", who=WHO)
    rollout.set_scope(engine, "model:b", mode="observe", percent=5, reason="r", who=WHO)
    rollout.set_scope(engine, "key:k", mode="off", reason="r", who=WHO)
    trail = len(audit(engine))

    killed = rollout.kill(engine, reason="answers look wrong", who="bob")

    assert [s.scope for s in killed] == ["*", "model:a"]
    scopes = rollout.load_state(engine).scopes
    assert {k: fields(v) for k, v in scopes.items()} == {
        "*": ("observe", 0.0, pid),  # the policy stays named, for the record and a restart
        "model:a": ("observe", 0.0, pid),
        "model:b": ("observe", 5.0, None),  # already observing: untouched
        "key:k": ("off", 0.0, None),  # neither shadowed nor enforced: stays off
    }
    assert all(scopes[k].reason == "answers look wrong" for k in ("*", "model:a"))
    assert audit(engine)[trail:] == [
        ("*", "mode", "enforce", "observe", "answers look wrong", "bob"),
        ("*", "percent", "25", "0", "answers look wrong", "bob"),
        ("model:a", "mode", "shadow", "observe", "answers look wrong", "bob"),
    ]


def test_kill_with_no_rows_writes_a_star_scope_that_overrides_flags(engine: Engine) -> None:
    killed = rollout.kill(engine, reason="stop", who=WHO)
    assert [fields(s) for s in killed] == [("observe", 0.0, None)]
    state = rollout.load_state(engine)
    for model, key in (("a", "k"), (None, None)):
        found = resolve(state, model, key)
        assert found is not None and found.mode == "observe"
    assert audit(engine) == [("*", "mode", None, "observe", "stop", WHO),
                             ("*", "percent", None, "0", "stop", WHO)]


def test_kill_writes_a_star_scope_whenever_there_is_none(engine: Engine) -> None:
    pid = add_policy(engine, model="a")
    rollout.set_scope(engine, "model:a", mode="enforce", percent=5, policy=pid, reason="r",
                      who=WHO)
    killed = rollout.kill(engine, reason="stop", who=WHO)
    assert [s.scope for s in killed] == ["model:a", "*"]
    # A proxy started with `--mode enforce` serves model b from its flags no more.
    found = resolve(rollout.load_state(engine), "b", None)
    assert found is not None and found.mode == "observe"


def test_kill_when_nothing_runs_changes_nothing(engine: Engine) -> None:
    rollout.kill(engine, reason="first", who=WHO)
    before = snapshot(engine)
    assert rollout.kill(engine, reason="again", who=WHO) == []
    assert snapshot(engine) == before
    with pytest.raises(RolloutError, match="a reason is required"):
        rollout.kill(engine, reason="", who=WHO)


def test_a_change_read_before_a_kill_cannot_undo_it(engine: Engine) -> None:
    """Writers hold the write lock from their first read: a promote waits for the kill."""
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="enforce", percent=5, policy=pid, reason="r", who=WHO)
    holder = engine.connect()
    # A kill in flight, not committed yet, holding the lock every rollout writer takes.
    if engine.dialect.name == "sqlite":
        holder.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": rollout.ROLLOUT_LOCK})
    holder.execute(text("UPDATE rollout_scopes SET mode = 'observe', percent = 0"))
    result: list[ScopeState | BaseException] = []

    def promote() -> None:
        try:
            result.append(rollout.promote(engine, "*", reason="up", who=WHO))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result.append(exc)

    worker = threading.Thread(target=promote)
    worker.start()
    time.sleep(0.3)  # let the promote reach the lock (ordering only; nothing is timed)
    holder.commit()
    holder.close()
    worker.join(timeout=30)
    assert len(result) == 1 and isinstance(result[0], ScopeState)
    # It read the killed state (observe), so it starts again at 1% instead of going to 10%.
    assert (result[0].mode, result[0].percent) == ("enforce", 1.0)


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_takes_an_enforced_scope_to_shadow_as_the_guardrail(engine: Engine) -> None:
    pid = add_policy(engine)
    rollout.set_scope(engine, "model:a", mode="enforce", percent=25, policy=pid, reason="r",
                      who=WHO)
    s = rollout.rollback(engine, "model:a", reason="guardrail: answers changed in 9%")
    assert fields(s) == ("shadow", 25.0, pid)
    assert (s.updated_by, s.reason) == ("guardrail", "guardrail: answers changed in 9%")
    assert audit(engine)[-1] == ("model:a", "mode", "enforce", "shadow",
                                 "guardrail: answers changed in 9%", "guardrail")


def test_rollback_of_a_scope_not_enforcing_changes_nothing(engine: Engine) -> None:
    """Several proxies' guardrails may trip at once: the second rollback is a no-op."""
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="enforce", percent=5, policy=pid, reason="r", who=WHO)
    rollout.rollback(engine, "*", reason="first proxy")
    before = snapshot(engine)
    s = rollout.rollback(engine, "*", reason="second proxy")
    assert fields(s) == ("shadow", 5.0, pid) and s.reason == "first proxy"
    assert snapshot(engine) == before


def test_rollback_of_an_unknown_scope_is_refused(engine: Engine) -> None:
    with pytest.raises(RolloutError, match="scope 'key:k' is not in the store"):
        rollout.rollback(engine, "key:k", reason="guardrail")
    assert snapshot(engine) == (RolloutState({}, 0), [], {})


# --- history and who --------------------------------------------------------------------------


def test_history_is_newest_first_limited_and_by_scope(engine: Engine) -> None:
    for i, scope in enumerate(("*", "model:a", "*")):
        rollout.set_scope(engine, scope, percent=i + 1, reason=f"change {i}", who=WHO)
    entries = rollout.history(engine, limit=3)
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert [(e.scope, e.field, e.previous, e.new) for e in entries] == [
        ("*", "percent", "1", "3"), ("model:a", "percent", None, "2"),
        ("model:a", "mode", None, "observe")]
    assert all(e.at.tzinfo is not None for e in entries)
    assert [e.reason for e in rollout.history(engine, scope="*")] == ["change 2", "change 0",
                                                                       "change 0"]
    with pytest.raises(RolloutError, match="at least 1"):
        rollout.history(engine, limit=0)


def test_current_user_names_the_os_user(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rollout.current_user()
    monkeypatch.setattr("getpass.getuser", lambda: "operator")
    assert rollout.current_user() == "operator"

    def nobody() -> str:
        raise OSError("no login name")

    monkeypatch.setattr("getpass.getuser", nobody)
    assert rollout.current_user().startswith("uid ")


# --- migration 0004 ---------------------------------------------------------------------------


def _rollout_tables(engine: Engine) -> set[str]:
    return {"rollout_scopes", "rollout_audit"} & set(inspect(engine).get_table_names())


def test_migration_0004_down_and_up_with_data_present(store_url: str) -> None:
    engine = db.make_engine(store_url)
    db.upgrade(engine, "0003")
    write_records(engine, [_record("a"), _record("b")])
    pid = add_policy(engine)
    assert not _rollout_tables(engine)

    db.upgrade(engine, "0004")
    assert db.current(engine) == "0004"
    assert _rollout_tables(engine) == {"rollout_scopes", "rollout_audit"}
    rollout.set_scope(engine, "*", mode="enforce", percent=5, policy=pid, reason="r", who=WHO)
    rollout.kill(engine, reason="stop", who=WHO)

    db.downgrade(engine, "0003")
    assert db.current(engine) == "0003" and not _rollout_tables(engine)
    with Session(engine) as s:  # observations and policies survive the way down
        assert s.scalar(select(func.count()).select_from(RequestRow)) == 2
        assert s.scalars(select(PolicyRow.id)).all() == [pid]

    db.upgrade(engine, "0004")
    assert db.current(engine) == "0004"
    assert rollout.load_state(engine) == RolloutState({}, 0)
    s = rollout.set_scope(engine, "*", mode="shadow", policy="latest", reason="again", who=WHO)
    assert s.policy_id == pid
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(RolloutAuditRow)) == 3
        assert session.scalar(select(func.count()).select_from(RequestRow)) == 2
