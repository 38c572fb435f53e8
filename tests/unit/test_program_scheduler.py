"""Every decision of the program scheduler, on plain calls (the engine side's view)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.core.certaindex import reward_certaindex
from proxy.scheduler.base import Job, JobKind
from proxy.scheduler.predict import WorkModel
from proxy.scheduler.program import DYNASOR, PROGRAM_FIFO, Config, ProgramScheduler

NO_FAIRNESS = replace(DYNASOR, fairness=None)


def job(request_id: str, program_id: str, arrival: float = 0.0, kind: JobKind = "sample",
        program_type: str = "sc", budget: int | None = None) -> Job:
    return Job(request_id, program_id, kind, arrival, program_type=program_type, budget=budget)


def submit(s: ProgramScheduler, *jobs: Job) -> None:
    for j in jobs:
        s.submit(j, j.arrival)


def run(s: ProgramScheduler, request_id: str, tokens: int, start: float, end: float) -> None:
    """A request admitted earlier generates `tokens` between `start` and `end`, and ends."""
    s.progress(request_id, tokens, end)
    s.finished(request_id, end)


def teach(s: ProgramScheduler, program_type: str, tokens: int, requests: int = 1,
          seconds_per_token: float = 0.01) -> None:
    """Let the scheduler learn a type from one whole program run alone."""
    program_id = f"teach-{program_type}-{tokens}-{requests}"
    submit(s, *(job(f"{program_id}/{i}", program_id, program_type=program_type)
                for i in range(requests)))
    admitted = s.admit(0.0, 0, requests)
    assert len(admitted) == requests
    for request_id in admitted:
        run(s, request_id, tokens, 0.0, tokens * seconds_per_token)
    s.program_done(program_id, tokens * seconds_per_token)


def test_never_admits_more_than_the_free_slots():
    s = ProgramScheduler()
    submit(s, *(job(f"r{i}", f"p{i}") for i in range(5)))
    assert len(s.admit(0.0, running=3, capacity=5)) == 2
    assert s.admit(0.0, running=5, capacity=5) == []
    assert len(s.admit(0.0, running=0, capacity=5)) == 3


def test_probes_go_first_even_behind_older_work():
    s = ProgramScheduler(NO_FAIRNESS)
    submit(s, job("a/0", "a"), job("b/0", "b"))
    submit(s, job("a/probe", "a", arrival=1.0, kind="probe"))
    assert s.admit(1.0, 0, 1) == ["a/probe"]


def test_without_probe_priority_a_probe_waits_with_its_program():
    s = ProgramScheduler(replace(PROGRAM_FIFO))
    submit(s, job("a/0", "a"), job("b/0", "b", arrival=0.5))
    submit(s, job("b/probe", "b", arrival=1.0, kind="probe"))
    assert s.admit(1.0, 0, 3) == ["a/0", "b/0", "b/probe"]


def test_gang_admits_a_programs_requests_together():
    s = ProgramScheduler(replace(NO_FAIRNESS, sjf=False))
    submit(s, job("a/0", "a"), job("b/0", "b", arrival=1.0), job("a/1", "a", arrival=2.0))
    assert s.admit(2.0, 0, 2) == ["a/0", "a/1"]


def test_without_gang_requests_go_one_by_one_in_arrival_order():
    s = ProgramScheduler(Config(gang=False, sjf=False, fairness=None))
    submit(s, job("a/0", "a"), job("b/0", "b", arrival=1.0), job("a/1", "a", arrival=2.0))
    assert s.admit(2.0, 0, 2) == ["a/0", "b/0"]


def test_program_fifo_serves_an_old_programs_next_step_before_a_newer_program():
    s = ProgramScheduler(PROGRAM_FIFO)
    submit(s, job("a/0", "a"))
    assert s.admit(0.0, 0, 1) == ["a/0"]
    submit(s, job("b/0", "b", arrival=1.0))
    run(s, "a/0", 10, 0.0, 2.0)
    submit(s, job("a/1", "a", arrival=2.0))  # a's second wave, after b arrived
    assert s.admit(2.0, 0, 1) == ["a/1"]


def test_shortest_predicted_work_first():
    s = ProgramScheduler(NO_FAIRNESS)
    teach(s, "long", 1000)
    teach(s, "short", 50)
    submit(s, job("l/0", "l", program_type="long"), job("s/0", "s", 1.0, program_type="short"))
    assert s.admit(1.0, 0, 1) == ["s/0"]


def test_without_sjf_programs_go_in_arrival_order():
    s = ProgramScheduler(replace(NO_FAIRNESS, sjf=False))
    teach(s, "long", 1000)
    teach(s, "short", 50)
    submit(s, job("l/0", "l", program_type="long"), job("s/0", "s", 1.0, program_type="short"))
    assert s.admit(1.0, 0, 1) == ["l/0"]


def test_requests_a_program_is_still_expected_to_make_count_as_work():
    s = ProgramScheduler(NO_FAIRNESS)
    for _ in range(3):
        teach(s, "sc", 100, requests=4)  # sc programs make 4 requests of 100 tokens
    teach(s, "cot", 250)  # cot programs make one of 250
    # A new sc program shows 1 request (100 tokens) but is expected to make 4 (400).
    submit(s, job("sc/0", "sc", program_type="sc"), job("cot/0", "cot", 1.0, program_type="cot"))
    assert s.admit(1.0, 0, 1) == ["cot/0"]


def test_an_sc_program_further_along_goes_before_a_new_one():
    s = ProgramScheduler(NO_FAIRNESS)
    for _ in range(3):
        teach(s, "sc", 100, requests=4)
    submit(s, job("a/0", "a"), job("a/1", "a"))
    assert s.admit(0.0, 0, 2) == ["a/0", "a/1"]
    submit(s, job("b/0", "b", 1.0), job("b/1", "b", 1.0))
    run(s, "a/0", 100, 0.0, 2.0)
    run(s, "a/1", 100, 0.0, 2.0)
    submit(s, job("a/2", "a", 2.0), job("a/3", "a", 2.0))  # its last wave: 2 left, not 4
    assert s.admit(2.0, 0, 2) == ["a/2", "a/3"]


def test_certaindex_shrinks_a_programs_predicted_work():
    s = ProgramScheduler(NO_FAIRNESS)
    for _ in range(3):
        teach(s, "sc", 100, requests=8)
    submit(s, job("a/0", "a"), job("b/0", "b", 1.0))
    s.signal("b", 0.9, 1.0)  # b has nearly converged: little of its budget is left to spend
    assert s.admit(1.0, 0, 1) == ["b/0"]


def test_without_certaindex_the_signal_changes_nothing():
    s = ProgramScheduler(replace(NO_FAIRNESS, use_certaindex=False))
    for _ in range(3):
        teach(s, "sc", 100, requests=8)
    submit(s, job("a/0", "a"), job("b/0", "b", 1.0))
    s.signal("b", 0.9, 1.0)
    assert s.admit(1.0, 0, 1) == ["a/0"]


def test_starvation_guard_escalates_a_program_that_waited_past_its_fair_share():
    s = ProgramScheduler(replace(DYNASOR, fairness=3.0))
    teach(s, "long", 400, seconds_per_token=0.01)  # alone: 4 s
    teach(s, "short", 10, seconds_per_token=0.01)
    submit(s, job("long/0", "long", 0.0, program_type="long"))
    now = 0.0
    served = []
    for i in range(40):  # a short program every 0.5 s keeps the only slot busy
        now = 0.5 * i
        submit(s, job(f"s{i}/0", f"s{i}", now, program_type="short"))
        served += s.admit(now, 0, 1)
        run(s, served[-1], 10, now, now + 0.1)
        if served[-1] == "long/0":
            break
    assert served[-1] == "long/0"
    assert 12.0 <= now <= 13.0  # 3 x its 4 s alone, not before


def test_without_the_guard_a_long_program_starves_behind_short_ones():
    s = ProgramScheduler(NO_FAIRNESS)
    teach(s, "long", 400)
    teach(s, "short", 10)
    submit(s, job("long/0", "long", 0.0, program_type="long"))
    served = []
    for i in range(40):
        now = 0.5 * i
        submit(s, job(f"s{i}/0", f"s{i}", now, program_type="short"))
        served += s.admit(now, 0, 1)
        run(s, served[-1], 10, now, now + 0.1)
    assert "long/0" not in served


def test_escalated_programs_go_in_the_order_they_crossed():
    s = ProgramScheduler(replace(DYNASOR, fairness=1.0))
    teach(s, "t", 100, seconds_per_token=0.01)  # alone: 1 s
    submit(s, job("a/0", "a", 0.0, program_type="t"), job("b/0", "b", 0.5, program_type="t"))
    s.signal("b", 0.99, 0.5)  # b looks shorter, but a crossed its line first
    assert s.admit(2.0, 0, 1) == ["a/0"]


def test_a_finished_program_frees_its_queue():
    s = ProgramScheduler(PROGRAM_FIFO)
    submit(s, job("a/0", "a"), job("a/1", "a"), job("b/0", "b", 1.0))
    assert s.admit(0.0, 0, 1) == ["a/0"]
    s.program_done("a", 1.0)  # a's policy stopped it: a/1 will never run
    assert s.admit(1.0, 0, 2) == ["b/0"]
    assert s.queued_programs == 0


def test_a_program_done_drops_its_queued_probes_too():
    s = ProgramScheduler()
    submit(s, job("a/0", "a"), job("a/probe", "a", kind="probe"))
    s.program_done("a", 1.0)
    assert s.admit(1.0, 0, 4) == []


def test_a_request_that_left_the_queue_is_never_admitted():
    s = ProgramScheduler()
    submit(s, job("a/0", "a"), job("a/1", "a"), job("p", "a", kind="probe"))
    s.finished("a/0", 0.5)  # its client left before it started
    s.finished("p", 0.5)
    assert s.admit(1.0, 0, 4) == ["a/1"]


def test_unknown_ids_are_ignored():
    s = ProgramScheduler()
    s.progress("nope", 5, 0.0)
    s.finished("nope", 0.0)
    s.signal("nope", 0.5, 0.0)
    s.step_done("nope", [0.5], 0.0)
    s.program_done("nope", 0.0)
    assert s.admit(0.0, 0, 4) == []


def test_a_duplicate_submission_is_admitted_once():
    s = ProgramScheduler()
    submit(s, job("a/0", "a"), job("a/0", "a"))
    assert s.admit(0.0, 0, 4) == ["a/0"]


def test_learned_tokens_per_request_and_requests_per_program():
    model = WorkModel(prior_tokens=300.0, weight=0.5)
    assert model.tokens("sc") == 300.0
    assert model.tokens("sc", max_tokens=100) == 100.0
    assert model.requests_left("sc", 2, budget=8) == 6.0  # nothing learned: the budget
    assert model.requests_left("cot", 1, budget=None) == 0.0
    model.learn_request("sc", 100)
    model.learn_request("sc", 200)
    assert model.tokens("sc") == 150.0
    for requests in (2, 2, 4, 8):
        model.learn_program("sc", requests)
    assert model.requests_left("sc", 0, 8) == 4.0
    assert model.requests_left("sc", 2, 8) == 2.0  # a program that made 2 may be done
    assert model.requests_left("sc", 3, 8) == 3.0  # of those that made at least 3: 4 and 8
    assert model.requests_left("sc", 8, 8) == 0.0


def test_an_idle_program_is_forgotten_and_counted_after_its_ttl():
    s = ProgramScheduler(replace(DYNASOR, idle_ttl=10.0))
    submit(s, job("a/0", "a", program_type="t"))
    s.admit(0.0, 0, 1)
    run(s, "a/0", 50, 0.0, 1.0)  # no program_done: a lone request, say
    s.admit(5.0, 0, 1)
    assert s.model.types["t"].requests == {}
    s.admit(12.0, 0, 1)
    assert s.model.types["t"].requests == {1: 1}


def test_a_step_between_waves_keeps_the_programs_place():
    s = ProgramScheduler(replace(PROGRAM_FIFO, idle_ttl=10.0))
    submit(s, job("a/0", "a"))
    s.admit(0.0, 0, 1)
    submit(s, job("b/0", "b", 1.0))
    run(s, "a/0", 10, 0.0, 2.0)
    s.admit(5.0, 1, 1)
    submit(s, job("a/1", "a", 6.0))  # within the ttl: still the program that came first
    assert s.admit(6.0, 0, 1) == ["a/1"]


@pytest.mark.parametrize(("program_type", "expected"), [("mcts", 0.5), ("rebase", 0.9)])
def test_step_rewards_become_the_reward_certaindex(program_type, expected):
    s = ProgramScheduler()
    submit(s, job("a/0", "a", kind="step", program_type=program_type))
    s.step_done("a", [0.1, 0.5], 1.0)
    s.step_done("a", [0.9], 2.0)
    assert s._programs["a"].certaindex == pytest.approx(expected)


def test_step_rewards_order_programs_like_any_certaindex():
    s = ProgramScheduler(NO_FAIRNESS)
    for _ in range(3):
        teach(s, "mcts", 50, requests=10)
    submit(s, job("a/0", "a", kind="step", program_type="mcts"),
           job("b/0", "b", 1.0, kind="step", program_type="mcts"))
    s.step_done("b", [0.95, 0.9], 1.0)  # b's search has converged on good answers
    s.step_done("a", [0.1, 0.2], 1.0)
    assert s.admit(1.0, 0, 1) == ["b/0"]


def test_reward_certaindex():
    assert reward_certaindex([]) == 0.0
    assert reward_certaindex([0.2, 0.4]) == pytest.approx(0.3)
    assert reward_certaindex([0.2, 0.4], "max") == 0.4
    assert reward_certaindex([-1.0, 2.0]) == 0.5  # clipped to [0, 1]
    with pytest.raises(ValueError):
        reward_certaindex([0.5], "median")



async def test_through_admission_probes_jump_the_queue_and_the_kill_switch_restores_fcfs():
    import asyncio

    from proxy.scheduler.admission import Admission
    from proxy.scheduler.base import Fcfs

    scheduler = ProgramScheduler(NO_FAIRNESS)
    for _ in range(3):
        teach(scheduler, "sc", 100, requests=8)
    admission = Admission(scheduler, capacity=1)
    started: list[str] = []
    release = {r: asyncio.Event() for r in ("a/0", "b/0", "c/0", "a/p")}

    async def request(j: Job) -> None:
        async with admission.slot(j):
            started.append(j.request_id)
            await release[j.request_id].wait()

    tasks = [asyncio.create_task(request(job("a/0", "a")))]
    while not started:
        await asyncio.sleep(0)
    tasks += [asyncio.create_task(request(j)) for j in (
        job("b/0", "b", 1.0), job("c/0", "c", 2.0), job("a/p", "a", 3.0, kind="probe"))]
    while admission.queued < 3:
        await asyncio.sleep(0)
    admission.signal("c", 0.9)  # c would now go before b
    release["a/0"].set()
    while len(started) < 2:
        await asyncio.sleep(0)
    assert started == ["a/0", "a/p"]  # the probe first, though it came last
    admission.replace(Fcfs())  # the kill switch: first come, first served for what waits
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert started == ["a/0", "a/p", "b/0", "c/0"]


@pytest.mark.parametrize("config", [DYNASOR, PROGRAM_FIFO, Config(gang=False, fairness=1.0)])
def test_random_traffic_admits_each_request_once_within_capacity_and_leaves_nothing(config):
    import random

    rng = random.Random(7)
    s = ProgramScheduler(replace(config, idle_ttl=5.0))
    queued: set[str] = set()
    running: set[str] = set()
    admitted: set[str] = set()
    done: set[str] = set()
    owner: dict[str, str] = {}
    capacity, now, n = 6, 0.0, 0
    for _ in range(3000):
        now += rng.random()
        action = rng.random()
        if action < 0.3:
            program = f"p{rng.randrange(40)}"
            if program in done:
                continue
            kind: JobKind = rng.choice(["sample", "cot", "probe", "step"])
            j = job(f"r{n}", program, now, kind=kind, program_type=rng.choice(["a", "b"]))
            n += 1
            s.submit(j, now)
            queued.add(j.request_id)
            owner[j.request_id] = program
        elif action < 0.5 and running:
            request_id = rng.choice(sorted(running))
            s.progress(request_id, rng.randrange(1, 500), now)
            if rng.random() < 0.5:
                s.finished(request_id, now)
                running.discard(request_id)
        elif action < 0.55 and queued:
            request_id = rng.choice(sorted(queued))  # a client leaves the queue
            s.finished(request_id, now)
            queued.discard(request_id)
        elif action < 0.6:
            program = f"p{rng.randrange(40)}"
            s.signal(program, rng.random(), now)
            s.step_done(program, [rng.random()], now)
        elif action < 0.63:
            program = f"p{rng.randrange(40)}"
            s.program_done(program, now)  # its queued requests are dropped by the caller
            done.add(program)
            queued -= {r for r in queued if owner[r] == program}
        out = s.admit(now, len(running), capacity)
        assert len(out) <= capacity - len(running)
        for request_id in out:
            assert request_id in queued and request_id not in admitted
            queued.discard(request_id)
            admitted.add(request_id)
            running.add(request_id)
    for request_id in list(running):
        s.finished(request_id, now)
    while queued:
        out = s.admit(now, 0, capacity)
        assert out, f"{len(queued)} requests queued but none admitted"
        for request_id in out:
            queued.discard(request_id)
            s.finished(request_id, now)
    assert s.queued_programs == 0
