"""Grammar v2 of the `tales` corpus: v1 stays bit for bit, v2's rules hold, shortcuts are beaten."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from spd_mcp.model.zoo.tales.corpus import (
    ANIMALS,
    BEHAVIOURS,
    BEHAVIOURS_V1,
    BEHAVIOURS_V2,
    DEFAULT_GRAMMAR,
    GENDER,
    NUMBERS,
    SCENERY,
    TalesCorpus,
    behaviours,
    probe_families,
)
from spd_mcp.model.zoo.tales.tokenizer import Tokenizer

# Fingerprints of grammar v1, recorded from the code before grammar v2 existed (the shipped
# `tales` run was trained on this stream). Any change to them changes the shipped run's data.
V1_STREAMS = {0: "382030ae42cb92cc", 1: "c923c1a7e21634ba", 12345: "e7584c7afd69d60f",
              424242: "9a47a42b9ed45ec5"}  # fmt: skip
V1_PROBES = {
    "pronoun": "b47a7b42223cf227", "agreement": "99bb9fcece2d7122",
    "induction": "f53b9faa7b1f0b49", "quote": "57e3c36d1b84f65a", "count": "fd6cbcf33cb49ac4",
    "attribute": "9568ef22df28c354",
}  # fmt: skip
V1_VOCAB = "87c9c7f9bc07737e"
V1_TOKENIZER = "92737810f4965f3e"
V1_STORY_12345_1 = (
    "one sunny morning , a shy boy named evan woke up early . evan had a friend called hannah . "
    "the rabbits near the new frog are scared . evan lost a kite in the library . the kite was "
    "yellow . hannah skipped to the school , and there she saw a frog . hannah was very sad that "
    "day ."
)
N_STORIES = 1500
PLURALS = {*ANIMALS.values(), *SCENERY.values()}


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stream_hash(corpus: TalesCorpus, n: int) -> str:
    parts = []
    for i in range(n):
        s = corpus.story(i)
        parts.append(s.text + "|" + ",".join(f"{m.behaviour}:{m.index}" for m in s.marks))
    return _h("\n".join(parts))


@pytest.fixture(scope="module")
def stories():
    corpus = TalesCorpus(7, grammar="v2")
    return [corpus.story(i) for i in range(N_STORIES)]


# ---------------------------------------------------------------------------------- v1 frozen


@pytest.mark.parametrize("seed", list(V1_STREAMS))
def test_v1_stream_unchanged(seed: int) -> None:
    assert _stream_hash(TalesCorpus(seed, grammar="v1"), 300) == V1_STREAMS[seed]
    assert _stream_hash(TalesCorpus(seed), 300) != V1_STREAMS[seed]  # the default is v2
    assert _stream_hash(TalesCorpus(seed, grammar="v1"), 300) == V1_STREAMS[seed]


def test_v1_probes_vocabulary_and_tokenizer_unchanged() -> None:
    assert TalesCorpus(12345, grammar="v1").story(1).text == V1_STORY_12345_1
    for name, b in BEHAVIOURS_V1.items():
        probes = b.probes(12345, 200)
        assert _h("\n".join(f"{p.prompt}|{p.expected}|{p.story_index}" for p in probes)) == (
            V1_PROBES[name]
        ), name
    assert _h(" ".join(TalesCorpus.vocabulary())) == V1_VOCAB
    assert _h(json.dumps(Tokenizer.from_corpus(TalesCorpus).to_dict())) == V1_TOKENIZER
    assert behaviours("v1") is BEHAVIOURS_V1
    for b in BEHAVIOURS_V1.values():  # v1 plants no shortcut families
        assert b.grammar == "v1" and b.shortcut_family is None
        with pytest.raises(ValueError, match="no shortcut family"):
            b.shortcut_probes(0, 1)


def test_one_vocabulary_and_tokenizer_for_both_grammars(stories) -> None:
    assert TalesCorpus.vocabulary("v2") == TalesCorpus.vocabulary("v1")
    used = {t for s in stories for t in s.tokens}
    assert used == set(TalesCorpus.vocabulary("v2"))  # v2 emits every word, and only those


def test_unknown_grammar_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tales grammar"):
        TalesCorpus(0, grammar="v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown tales grammar"):
        behaviours("v0")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- v2 text


def test_v2_deterministic_random_access_and_distinct_from_v1() -> None:
    corpus = TalesCorpus(3, grammar="v2")
    a = [corpus.story(i).text for i in range(40)]
    assert a == [TalesCorpus(3, grammar="v2").story(i).text for i in range(40)]
    assert a[:5] == [s for s, _ in zip(corpus.stories(), range(5), strict=False)]
    v1 = (TalesCorpus(3, grammar="v1").story(i).text for i in range(40))
    assert all(x != y for x, y in zip(a, v1, strict=True))
    assert TalesCorpus(4, grammar="v2").story(0).text != a[0]


def test_v2_lengths_fit_context(stories) -> None:
    lengths = [len(s.tokens) for s in stories]
    assert min(lengths) >= TalesCorpus.MIN_TOKENS
    assert max(lengths) <= TalesCorpus.MAX_TOKENS <= 128 - 2
    assert 50 <= sum(lengths) / len(lengths) <= 100


@pytest.mark.parametrize("name", list(BEHAVIOURS_V2))
def test_v2_rule_determines_next_token_everywhere(stories, name: str) -> None:
    """Wherever a v2 rule fires in v2 text, the grammar produced exactly its answer."""
    behaviour = BEHAVIOURS_V2[name]
    fired = 0
    for story in stories[:700]:
        marked = {m.index for m in story.marks if m.behaviour == name}
        for i in range(1, len(story.tokens)):
            answer = behaviour.predict(story.tokens[:i])
            if answer is not None:
                fired += 1
                assert answer == story.tokens[i], (name, " ".join(story.tokens[: i + 1]))
            if i in marked:
                assert answer == story.tokens[i]
    assert fired >= 150


def _cues(tokens: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Name -> the bigram that introduced it (`girl named`, `friend called`, ...)."""
    return {tokens[i + 2]: (tokens[i], tokens[i + 1]) for i in range(len(tokens) - 2)
            if tokens[i + 1] in ("named", "called") and tokens[i + 2] in GENDER
            and tokens[i + 2] not in tokens[:i]}


def test_v2_induction_cues_are_decorrelated_from_order_gender_and_frequency(stories) -> None:
    girl_boy_first = girl_boy_second = same_gender_pairs = 0
    recalled = Counter[str]()
    for story in stories:
        t = story.tokens
        cues = _cues(t)
        nouns = [c[0] for c in cues.values()]
        assert len(set(nouns)) == len(nouns), story.text  # one character per cue noun
        for name, (noun, _) in cues.items():
            assert noun == "friend" or noun == ("girl" if GENDER[name] == "female" else "boy")
        order = list(cues)
        if len(order) == 2:
            girl_boy_first += nouns[0] != "friend"
            girl_boy_second += nouns[1] != "friend"
            same_gender_pairs += GENDER[order[0]] == GENDER[order[1]]
            for m in story.marks:
                if m.behaviour == "induction":
                    who = t[m.index]
                    recalled["first" if who == order[0] else "second"] += 1
                    counts = Counter(x for x in t[: m.index] if x in GENDER)
                    most = sorted(order, key=lambda n: -counts[n])[0]  # ties: the first one
                    recalled["most_named" if who == most else "less_named"] += 1
    pairs = sum(len(_cues(s.tokens)) == 2 for s in stories)
    assert pairs > 0.6 * len(stories)
    # The `girl|boy` cue belongs to the first character about half the time (v1: always).
    assert 0.4 < girl_boy_first / pairs < 0.6 and 0.5 < girl_boy_second / pairs < 0.8
    assert 0.35 < same_gender_pairs / pairs < 0.55  # v1: 30%
    # Recalls pick either character, whichever came first or has been named most so far.
    assert 0.4 < recalled["first"] / (recalled["first"] + recalled["second"]) < 0.6
    assert 0.4 < recalled["less_named"] / (recalled["most_named"] + recalled["less_named"]) < 0.6


# ------------------------------------------------------------------------- probes, shortcuts


@pytest.mark.parametrize("name", list(BEHAVIOURS_V2))
def test_v2_probes_are_story_prefixes_that_follow_the_rule(name: str) -> None:
    behaviour = BEHAVIOURS_V2[name]
    assert behaviour.grammar == "v2" and behaviour.shortcuts
    assert behaviour.predict(behaviour.example_prompt.split(" ")) == behaviour.example_expected
    for family, probes in ((name, behaviour.probes(99, 60)),
                           (f"{name}_shortcut", behaviour.shortcut_probes(99, 60))):
        assert probes == probe_families("v2")[family](99, 60)  # deterministic
        assert len(probes) == 60 and len({p.story_index for p in probes}) == 60
        for probe in probes:
            assert probe.behaviour == family and probe.seed == 99
            story = TalesCorpus(99, grammar="v2").story(probe.story_index).tokens
            prompt = probe.prompt.split(" ")
            assert list(story[: len(prompt)]) == prompt
            assert story[len(prompt)] == probe.expected
            assert behaviour.predict(prompt) == probe.expected


@pytest.mark.parametrize("name", list(BEHAVIOURS_V2))
def test_every_shortcut_is_wrong_on_every_shortcut_probe(name: str) -> None:
    behaviour = BEHAVIOURS_V2[name]
    probes = behaviour.shortcut_probes(12345, 150)
    for probe in probes:
        prompt = probe.prompt.split(" ")
        assert behaviour.predict(prompt) == probe.expected
        for shortcut in behaviour.shortcuts:
            assert shortcut.predict(prompt) != probe.expected, (shortcut.name, probe.prompt)


# The shortcut of each behaviour that v1 text never (or rarely) contradicts.
V1_CONFOUNDS = {"pronoun": "frequent_character", "agreement": "animal_noun",
                "induction": "verb_first", "quote": "quote_in_sentence", "count": "successor",
                "attribute": "nearest_object"}  # fmt: skip


def _agreement_rates(corpus: TalesCorpus, name: str, n: int) -> dict[str, float]:
    """Per shortcut: how often it gives the rule's answer where the rule fires in the text."""
    behaviour = BEHAVIOURS_V2[name]  # v2 rules also hold on v1 text (they generalise v1's)
    fired, agree = 0, Counter[str]()
    for i in range(n):
        tokens = corpus.story(i).tokens
        for j in range(1, len(tokens)):
            answer = behaviour.predict(tokens[:j])
            if answer is None:
                continue
            assert answer == tokens[j]
            fired += 1
            for s in behaviour.shortcuts:
                agree[s.name] += s.predict(tokens[:j]) == answer
    return {s.name: agree[s.name] / fired for s in behaviour.shortcuts}


@pytest.mark.parametrize("name", list(BEHAVIOURS_V2))
def test_v2_text_contradicts_every_shortcut_that_v1_text_taught(name: str) -> None:
    v1 = _agreement_rates(TalesCorpus(7, grammar="v1"), name, 500)
    v2 = _agreement_rates(TalesCorpus(7, grammar="v2"), name, 500)
    confound = V1_CONFOUNDS[name]
    if name == "pronoun":  # v1 already contradicted it at ~20% of positions; v2 keeps that
        assert 0.75 <= v1[confound] <= 0.85 and v2[confound] <= 0.86, (v1, v2)
    else:  # a (near-)perfect confound in v1 that v2 contradicts at >= 25% of positions
        assert v1[confound] >= (0.75 if name == "agreement" else 0.99), v1
        assert v2[confound] <= 0.75, v2
    # Every listed shortcut is wrong at >= 14% of the rule's positions in v2 training text.
    assert max(v2.values()) <= 0.86, v2


def test_shortcut_families_have_varied_answers() -> None:
    def answers(name: str) -> Counter[str]:
        return Counter(p.expected for p in BEHAVIOURS_V2[name].shortcut_probes(5, 200))

    assert set(answers("pronoun")) == {"she", "he"}
    assert set(answers("agreement")) == {"is", "are"}
    assert set(answers("quote")) == {'"', "."}
    assert len(answers("induction")) >= 40
    assert len(answers("count")) >= 12
    assert len(answers("attribute")) >= 8


def test_induction_shortcut_probes_recall_the_later_character() -> None:
    """The confound found on the shipped run: `girl named` recalled the first character."""
    for probe in BEHAVIOURS_V2["induction"].shortcut_probes(3, 100):
        t = probe.prompt.split(" ")
        names = [x for x in t if x in GENDER]
        assert probe.expected != names[0] and probe.expected != names[-1]
        first_intro = t.index(names[0])
        assert t.index(probe.expected) > first_intro


def test_count_and_agreement_shortcut_probes() -> None:
    for probe in BEHAVIOURS_V2["count"].shortcut_probes(3, 50):  # counting down
        *_, a, comma, b, _ = probe.prompt.split(" ")
        ia, ib, ie = (NUMBERS.index(w) for w in (a, b, probe.expected))
        assert comma == "," and ia - ib == ib - ie == 1
    heads = Counter[str]()
    for probe in BEHAVIOURS_V2["agreement"].probes(3, 200):
        s = probe.prompt.split(" . ")[-1].split(" ")
        head_plural, attractor_plural = s[1] in PLURALS, s[-1] in PLURALS
        assert attractor_plural != head_plural  # opposite-number attractor, as in v1
        assert probe.expected == ("are" if head_plural else "is")
        heads["animal" if s[1] in {*ANIMALS, *ANIMALS.values()} else "scenery"] += 1
    assert min(heads.values()) > 60  # v1 heads were always animals


def test_quote_shortcut_probes_cover_both_new_constructions() -> None:
    closing = narration = 0
    for probe in BEHAVIOURS_V2["quote"].shortcut_probes(3, 100):
        sentence = probe.prompt.split(" . ")[-1]
        if probe.expected == '"':  # a quote opened before the last `.`
            assert '"' not in sentence and probe.prompt.count('"') % 2 == 1
            closing += 1
        else:  # narration after a quote closed in the same sentence
            assert sentence.count('"') == 2 and " , and " in sentence
            narration += 1
    assert closing > 20 and narration > 20


# --------------------------------------------------------------------------- evaluation, entry


def _oracle(tokenizer: Tokenizer, answer) -> object:
    """A logits_fn whose top-1 after each row's last real token is ``answer(prefix)``."""

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, tokenizer.vocab_size)
        for b, row in enumerate(ids.tolist()):
            last = max(i for i, t in enumerate(row) if t != tokenizer.pad_id)
            prefix = tokenizer.decode(row[: last + 1]).split(" ")
            out[b, last, tokenizer.token_to_id(answer(prefix) or "<unk>")] = 1.0
        return out

    return logits_fn


def test_evaluate_behaviours_scores_rule_and_shortcut_oracles() -> None:
    from spd_mcp.model.zoo.tales.train import evaluate_behaviours

    tok = Tokenizer.from_corpus(TalesCorpus)

    def rule(prefix: list[str]) -> str | None:
        for b in BEHAVIOURS_V2.values():
            if (answer := b.predict(prefix)) is not None:
                return answer
        return None

    scores = evaluate_behaviours(_oracle(tok, rule), tok, n=40, grammar="v2")
    assert list(scores) == [k for b in BEHAVIOURS_V2 for k in (b, f"{b}_shortcut")]
    assert all(v == 1.0 for v in scores.values()), scores
    assert list(evaluate_behaviours(_oracle(tok, rule), tok, n=5, grammar="v1")) == list(
        BEHAVIOURS_V1)
    # A model that answers by the first-introduced character fails every induction_shortcut
    # probe but gets about half of the induction probes.
    first = BEHAVIOURS_V2["induction"].shortcuts[0]
    assert first.name == "first_character"
    scores = evaluate_behaviours(_oracle(tok, first.predict), tok, n=100, grammar="v2")
    assert scores["induction_shortcut"] == 0.0 and 0.45 < scores["induction"] < 0.75


def test_entry_grammar_kwarg_flows_from_config_to_corpus_and_behaviours() -> None:
    from spd_mcp.model.config import parse_config
    from spd_mcp.model.targets import resolve_target
    from spd_mcp.model.zoo import get_entry
    from spd_mcp.model.zoo.tales.entry import TalesEntry

    default = get_entry("tales")
    assert DEFAULT_GRAMMAR == "v2" and behaviours() is BEHAVIOURS is BEHAVIOURS_V2
    assert default.kwargs.grammar == "v2" and default.behaviours() is BEHAVIOURS  # shipped run
    assert default.dataset_text(0) == TalesCorpus(1, grammar="v2").story(0).text
    v1 = TalesEntry(grammar="v1")
    assert v1.behaviours() is BEHAVIOURS_V1
    assert v1.dataset_text(0) == TalesCorpus(1, grammar="v1").story(0).text
    assert v1.default_config()["target"]["kwargs"] == {"grammar": "v1"}
    cfg = TalesEntry().default_config()
    assert cfg["target"] == {"zoo": "tales", "kwargs": {"grammar": "v2"}}
    target = resolve_target(parse_config(cfg).target)
    entry = target.entry
    assert isinstance(entry, TalesEntry) and entry.kwargs.grammar == "v2"
    assert entry.behaviours() is BEHAVIOURS_V2
    assert entry.dataset_text(0) == TalesCorpus(1, grammar="v2").story(0).text
    assert entry.heldout_text(3) == TalesCorpus(424_242, grammar="v2").story(3).text
    assert entry.tokenizer == default.tokenizer
    batch = entry.sample_batch(4, "cpu")  # (B, T) from the v2 SPD stream
    first = entry.tokenizer.decode(batch[0].tolist())
    assert first in {TalesCorpus(1 + 4, grammar="v2").story(i).text for i in range(32)}
    with pytest.raises(ValueError):
        TalesEntry(grammar="v3")


def test_shipped_run_is_v2() -> None:
    from spd_mcp.model.run_io import load_run

    run = load_run("tales")
    assert run.target.entry.kwargs.grammar == "v2"
    assert run.target.entry.behaviours() is BEHAVIOURS_V2
    assert run.target.entry.tokenizer == Tokenizer.from_corpus(TalesCorpus(0, grammar="v2"))
