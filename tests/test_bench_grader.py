"""The bench grader on `tales`: known necessary and specific component sets pass their tasks;
random, oversized and unspecific sets fail on the criterion they break; an inconclusive summary
is counted apart; bad inputs are `invalid` with a reason. Task files load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spd_mcp.analysis.sweep import ablation_sweep
from spd_mcp.bench import Answer, BenchTask, TaskError, grade, load_task, load_tasks
from spd_mcp.bench.grade import alive_on, behaviour_score, probe_batches
from spd_mcp.bench.tasks import RESERVED_SEEDS
from spd_mcp.investigation.taskdir import create_task
from spd_mcp.keys import ComponentKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS
from spd_mcp.model.zoo.tales.entry import HELD_OUT_TEXT_SEED, SPD_DATA_SEED
from spd_mcp.model.zoo.tales.train import EVAL_SEED
from tests.bench_support import answer, failed

DISCOVERY_SEED = 9091
"""Probes the known sets were selected on (never a task's probe seed)."""

# Known sets: the greedy necessary sets of `ablation_sweep` on single probes (seed 5151) as
# candidates, then a batched greedy on 48-96 probes of DISCOVERY_SEED adding the candidate that
# lowers the behaviour's mean expected-token probability most while every other behaviour
# drops <= 0.05-0.1. Numbers in docs/bench.md; graded here on the tasks' held-out seeds.
KNOWN: dict[str, tuple[str, list[str]]] = {
    "pronoun": ("pronoun-she-or-he", [
        "0.mlp.up:58", "0.mlp.up:48", "1.mlp.up:121", "1.mlp.up:116", "0.mlp.down:61",
        "1.mlp.up:41", "1.mlp.up:72", "0.mlp.down:113", "1.mlp.up:13", "1.mlp.down:32"]),
    "agreement": ("agreement-verb-number", [
        "0.attn.o:63", "1.mlp.up:89", "1.mlp.down:84", "1.attn.o:87", "1.attn.v:8",
        "0.mlp.up:96", "0.mlp.down:10", "0.mlp.up:120", "1.mlp.up:20", "1.mlp.down:9",
        "1.attn.o:20", "0.mlp.down:89"]),
    "induction": ("induction-name-copy", ["0.attn.v:15", "0.attn.v:109", "0.attn.k:79"]),
    "quote": ("quote-closing-mark", ["0.attn.v:20", "0.attn.v:100", "1.attn.k:79"]),
    "count": ("count-next-number", ["0.attn.q:60", "1.attn.q:35"]),
    "attribute": ("attribute-object-colour", ["0.attn.k:15", "1.attn.k:98", "1.attn.q:4"]),
}
BREAKERS = ["1.attn.q:79", "0.attn.o:121"]
"""Components whose ablation breaks several behaviours (agreement, quote, induction...)."""


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


@pytest.fixture(scope="module")
def tasks() -> dict[str, BenchTask]:
    return {t.id: t for t in load_tasks(suite="tales")}




# ---------------------------------------------------------------------------------- tasks
def test_tasks_load_cover_every_behaviour_and_are_held_out(tasks: dict[str, BenchTask]) -> None:
    assert len(tasks) >= 12
    assert {t.behaviour for t in tasks.values()} == set(BEHAVIOURS)
    assert all(t.run == "tales" for t in tasks.values())
    assert any(t.distributed for t in tasks.values())
    assert {"prob", "accuracy"} == {t.metric for t in tasks.values()}
    used = {EVAL_SEED, SPD_DATA_SEED, HELD_OUT_TEXT_SEED, 0, 7, 99}  # train, demo, editing
    assert used <= RESERVED_SEEDS
    assert not {t.probe_seed for t in tasks.values()} & (RESERVED_SEEDS | {DISCOVERY_SEED, 5151})
    for family, (tid, _) in KNOWN.items():
        assert tasks[tid].behaviour == family


GOOD = ("id: t\nrun: tales\nquestion: q\nbehaviour: count\nthreshold: 0.5\ntolerance: 0.1\n"
        "budget: 4\nprobe_seed: 5\n")


@pytest.mark.parametrize(("text", "name", "needle"), [
    (GOOD + "colour: red\n", "t", "field 'colour': Extra inputs are not permitted"),
    (GOOD.replace("threshold: 0.5\n", ""), "t", "field 'threshold': Field required"),
    (GOOD.replace("budget: 4", "budget: many"), "t", "field 'budget'"),
    (GOOD, "other", "field 'id': 't' must equal the file name 'other'"),
    (GOOD.replace("tolerance: 0.1", "tolerance: 0.6"), "t", "must be below threshold"),
    (GOOD.replace("probe_seed: 5", "probe_seed: 99"), "t", "probe_seed 99 is not held out"),
    (GOOD + "distributed: true\n", "t", "distributed task needs budget >= 16"),
    ("- a list\n", "t", "a task is a mapping"),
])
def test_bad_task_files_name_the_file_and_field(tmp_path: Path, text: str, name: str,
                                                needle: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(TaskError) as e:
        load_task(path)
    assert str(path) in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------------------------- grading
@pytest.mark.parametrize("family", list(KNOWN))
def test_known_set_passes_and_a_random_set_fails(session: RunSession,
                                                 tasks: dict[str, BenchTask],
                                                 family: str) -> None:
    tid, keys = KNOWN[family]
    task = tasks[tid]
    r = grade(session, task, answer(keys))
    assert r.outcome == "success" and r.success, r.reason
    assert r.scores is not None and r.seconds < 30
    s = r.scores
    assert s.own.drop >= task.threshold and s.own.prob_before > 0.99
    assert s.own.prob_after == pytest.approx(s.own.prob_before * (1 - s.own.drop), abs=1e-3)
    assert len(s.others) == len(BEHAVIOURS) - 1
    assert max(o.drop for o in s.others) <= task.tolerance
    assert s.random.n_sets == task.n_random and s.random.mean_drop < task.threshold
    # A random set of the same size per layer, alive on the probes, is not necessary.
    gen = torch.Generator().manual_seed(1)
    alive = alive_on(session, probe_batches(session, family, task.probe_seed, task.n_probes))
    pool = [a for a in alive if str(a) not in keys]
    rand = [str(pool[i]) for i in torch.randperm(len(pool), generator=gen)[:len(keys)].tolist()]
    r = grade(session, task, answer(rand))
    assert r.outcome == "wrong" and "necessity" in failed(r), r.reason
    assert r.reason.startswith("necessity: ")


def test_oversized_set_fails_on_size_only(session: RunSession,
                                          tasks: dict[str, BenchTask]) -> None:
    tid, keys = KNOWN["count"]
    task = tasks[tid]
    extra = [f"0.mlp.up:{c}" for c in range(task.budget - len(keys) + 1)]
    r = grade(session, task, answer(keys + extra + keys))  # duplicates count once
    assert len(r.components) == task.budget + 1
    assert r.outcome == "wrong" and failed(r) == {"size"}, r.reason
    assert f"{task.budget + 1} components (budget {task.budget})" in r.reason


@pytest.mark.parametrize(("family", "keys"), [
    ("quote", ["1.attn.q:79"]),  # necessary for quote, but agreement goes with it
    ("induction", KNOWN["induction"][1] + ["0.attn.o:121"]),  # the right set plus a breaker
])
def test_necessary_but_unspecific_set_fails_on_specificity(
        session: RunSession, tasks: dict[str, BenchTask], family: str, keys: list[str]) -> None:
    task = tasks[KNOWN[family][0]]
    r = grade(session, task, answer(keys))
    assert r.outcome == "wrong" and failed(r) == {"specificity"}, r.reason
    assert r.scores is not None and r.scores.specificity.value > 0.3


def test_breakers_break_every_other_behaviour_they_touch(session: RunSession,
                                                         tasks: dict[str, BenchTask]) -> None:
    r = grade(session, tasks["count-next-number"], answer(BREAKERS))
    assert r.scores is not None
    broken = {o.behaviour for o in r.scores.others if o.drop > 0.3}
    assert {"agreement", "quote", "induction"} <= broken, r.scores.others


def test_inconclusive_status_is_counted_apart(session: RunSession,
                                              tasks: dict[str, BenchTask]) -> None:
    tid, keys = KNOWN["count"]
    r = grade(session, tasks[tid], answer(keys, status="inconclusive"))
    assert r.outcome == "inconclusive" and not r.success
    assert r.scores is not None and r.scores.necessity.passed  # measured all the same
    r = grade(session, tasks[tid], Answer(explanation=None, status="inconclusive"))
    assert r.outcome == "inconclusive" and r.scores is None
    r = grade(session, tasks[tid], answer(["1.mlp.up:999"], status="inconclusive"))
    assert r.outcome == "inconclusive" and "out of range" in r.reason


@pytest.mark.parametrize(("change", "explanation", "needle"), [
    ({"behaviour": "sarcasm"}, {"components": [{"key": "0.mlp.up:1"}]},
     "run 'tales' has no planted behaviour 'sarcasm'; known: pronoun"),
    ({"run": "tms-5-2"}, {"components": [{"key": "0.mlp.up:1"}]},
     "task is for run 'tms-5-2', the session holds 'tales'"),
    ({}, None, "no explanation saved"),
    ({}, {"components": []}, "explanation has no components"),
    ({}, {"components": [{"role": "r"}]}, "components[0] has no string 'key'"),
    ({}, {"components": [{"key": "0.mlp.up:1"}, {"key": "1.mlp.up:999"}]},
     "components[1].key: '1.mlp.up:999': component index 999 out of range"),
    ({}, {"components": [{"key": "7.attn.q:1"}]}, "unknown layer '7.attn.q'"),
])
def test_ungradable_answers_are_invalid_with_a_reason(
        session: RunSession, tasks: dict[str, BenchTask], change: dict[str, str],
        explanation: dict[str, object] | None, needle: str) -> None:
    task = tasks["count-next-number"].model_copy(update=change)
    r = grade(session, task, Answer(explanation=explanation))
    assert r.outcome == "invalid" and not r.success and r.scores is None
    assert needle in r.reason, r.reason


def test_answer_reads_the_task_directory(tmp_path: Path, session: RunSession,
                                         tasks: dict[str, BenchTask]) -> None:
    td = create_task("tales", "q", path=tmp_path / "t")
    assert Answer.from_task_dir(td.path) == Answer(explanation=None, status="in_progress")
    first = answer(["0.attn.q:60"]).explanation
    last = answer(KNOWN["count"][1]).explanation
    assert first is not None and last is not None
    td.append_explanation(first)
    td.append_explanation({**last, "explanation_id": "exp-002-beef"})
    td.set_summary("count", "found it", "completed")
    a = Answer.from_task_dir(td.path)
    assert a.status == "completed" and a.explanation is not None
    assert a.explanation["explanation_id"] == "exp-002-beef"
    assert Answer.from_task_dir(td.path, "exp-001-abcd").explanation == first
    assert grade(session, tasks["count-next-number"], a).outcome == "success"


def test_sweep_found_induction_set_passes_on_held_out_probes(
        session: RunSession, tasks: dict[str, BenchTask]) -> None:
    """End to end: greedy sweep sets on a few probes of one seed, minus components that hurt
    another behaviour on a second seed, pass the task graded on its own held-out seed."""
    task = tasks["induction-name-copy"]
    union: list[ComponentKey] = []
    for p in BEHAVIOURS["induction"].probes(5151, 6):
        sw = ablation_sweep(session, session.encode(p.prompt), session.token_id(p.expected),
                            greedy_steps=4, stop_prob=0.1, top=1)
        union += [ComponentKey.parse(k) for k in sw.necessary_set if ComponentKey.parse(k)
                  not in union]
    probe = task.model_copy(update={"probe_seed": DISCOVERY_SEED, "n_probes": 32})
    specific = [c for c in union if all(
        behaviour_score(session, probe, b, [c]).drop <= task.tolerance / 2
        for b in BEHAVIOURS if b != "induction")]
    assert len(specific) < len(union)  # the sweep also finds shared components
    r = grade(session, task, answer([str(c) for c in specific]))
    assert r.outcome == "success", r.reason
