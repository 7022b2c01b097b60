"""Tests for the `tales` story generator and its planted behaviours."""

from __future__ import annotations

import itertools

import pytest

from spd_mcp.model.zoo.tales.corpus import (
    BEHAVIOURS,
    FEMALE_NAMES,
    GENDER,
    MALE_NAMES,
    NAMES,
    OBJECT_COLOUR,
    TalesCorpus,
)

N_STORIES = 2000


@pytest.fixture(scope="module")
def stories():
    corpus = TalesCorpus(seed=7)
    return [corpus.story(i) for i in range(N_STORIES)]


def test_same_seed_same_stories() -> None:
    a = list(itertools.islice(TalesCorpus(3).stories(), 50))
    b = list(itertools.islice(TalesCorpus(3).stories(), 50))
    assert a == b


def test_different_seed_different_stories() -> None:
    a = list(itertools.islice(TalesCorpus(3).stories(), 50))
    b = list(itertools.islice(TalesCorpus(4).stories(), 50))
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 49


def test_story_random_access_matches_stream() -> None:
    corpus = TalesCorpus(11)
    stream = list(itertools.islice(corpus.stories(), 5))
    assert stream == [corpus.story(i).text for i in range(5)]


def test_text_format(stories) -> None:
    for story in stories[:200]:
        assert story.text == story.text.lower()
        assert "  " not in story.text and story.text == story.text.strip()
        assert story.text.split(" ") == list(story.tokens)


def test_story_lengths_fit_context(stories) -> None:
    lengths = [len(s.tokens) for s in stories]
    assert min(lengths) >= TalesCorpus.MIN_TOKENS
    assert max(lengths) <= TalesCorpus.MAX_TOKENS <= 128 - 2
    assert 50 <= sum(lengths) / len(lengths) <= 100


def test_stories_are_varied(stories) -> None:
    assert len({s.text for s in stories}) == len(stories)
    first_sentences = {s.text.split(" . ")[1] for s in stories if s.text.count(" . ") > 2}
    assert len(first_sentences) > 500


def test_vocabulary_covers_generated_text(stories) -> None:
    vocab = TalesCorpus.vocabulary()
    assert vocab == sorted(set(vocab))
    assert 200 <= len(vocab) <= 600
    used = {t for s in stories for t in s.tokens}
    assert used <= set(vocab)
    assert len(used) / len(vocab) > 0.99  # nearly everything is reachable in 2,000 stories


def test_names_are_many_gendered_and_distinct() -> None:
    assert len(NAMES) >= 60 and len(set(NAMES)) == len(NAMES)
    assert set(GENDER) == set(NAMES)
    assert not set(FEMALE_NAMES) & set(MALE_NAMES)
    other_words = set(TalesCorpus.vocabulary()) - set(NAMES)
    assert not set(NAMES) & other_words


def test_behaviour_names() -> None:
    expected = {"pronoun", "agreement", "induction", "quote", "count", "attribute"}
    assert expected <= set(BEHAVIOURS)
    for name, behaviour in BEHAVIOURS.items():
        assert behaviour.name == name and behaviour.rule


@pytest.mark.parametrize("name", list(BEHAVIOURS))
def test_behaviour_example_follows_rule(name: str) -> None:
    behaviour = BEHAVIOURS[name]
    assert behaviour.predict(behaviour.example_prompt.split(" ")) == behaviour.example_expected


@pytest.mark.parametrize("name", list(BEHAVIOURS))
def test_probes_deterministic_and_regenerable(name: str) -> None:
    behaviour = BEHAVIOURS[name]
    probes = behaviour.probes(seed=99, n=60)
    assert probes == behaviour.probes(seed=99, n=60)
    assert probes != behaviour.probes(seed=100, n=60)
    vocab = set(TalesCorpus.vocabulary())
    for probe in probes:
        assert probe.behaviour == name and probe.expected in vocab
        # The prompt is a real story prefix and the story's next token is the expected one.
        story = TalesCorpus(probe.seed).story(probe.story_index).tokens
        prompt = probe.prompt.split(" ")
        assert list(story[: len(prompt)]) == prompt
        assert story[len(prompt)] == probe.expected
        # The rule, applied to the prompt alone, gives the same answer.
        assert behaviour.predict(prompt) == probe.expected


@pytest.mark.parametrize("name", list(BEHAVIOURS))
def test_rule_determines_next_token_everywhere(stories, name: str) -> None:
    """Wherever a rule fires in generated text, the grammar produced exactly its answer."""
    behaviour = BEHAVIOURS[name]
    fired = 0
    for story in stories[:600]:
        marked = {m.index for m in story.marks if m.behaviour == name}
        for i in range(1, len(story.tokens)):
            answer = behaviour.predict(story.tokens[:i])
            if answer is not None:
                fired += 1
                assert answer == story.tokens[i], (name, " ".join(story.tokens[: i + 1]))
            if i in marked:
                assert answer == story.tokens[i]
    assert fired >= 150


def test_probe_answers_are_varied() -> None:
    def answers(name: str) -> set[str]:
        return {p.expected for p in BEHAVIOURS[name].probes(seed=5, n=200)}

    assert answers("pronoun") == {"she", "he"}
    assert answers("agreement") == {"is", "are"}
    assert answers("quote") == {'"', "."}
    assert len(answers("induction")) >= 50
    assert len(answers("count")) >= 12
    assert answers("attribute") == set(OBJECT_COLOUR.values())


def test_pronoun_probes_have_gap_after_name() -> None:
    for probe in BEHAVIOURS["pronoun"].probes(seed=3, n=100):
        tail = probe.prompt.split(" ")[-3:]
        assert not set(tail) & set(NAMES)


def test_agreement_probes_have_opposite_number_attractor() -> None:
    for probe in BEHAVIOURS["agreement"].probes(seed=3, n=100):
        attractor = probe.prompt.split(" ")[-1]
        plural_attractor = attractor.endswith("s") or attractor == "mice"
        assert plural_attractor == (probe.expected == "is")
