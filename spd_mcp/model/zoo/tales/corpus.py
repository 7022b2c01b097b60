"""The `tales` corpus: procedurally generated children's stories with planted behaviours.

Every story is built from sentence templates. Template text is a space-separated token list in
which ``{slot}`` expands through a slot function and ``{slot:behaviour}`` additionally marks the
single token emitted by that slot as a *probe point* of ``behaviour``: at that position the
grammar allows exactly one next token, and a probe's prompt is the story prefix just before it.

The vocabulary is derived from the template literals and word lists (never from sampling), so
``TalesCorpus.vocabulary()`` is exactly the set of tokens the grammar can emit.

Two grammars: ``v1`` (default; the shipped run's, frozen) and ``v2``, which breaks the shortcuts
v1 text left open (each v2 ``Behaviour`` lists them, with a ``<name>_shortcut`` probe family
that no shortcut solves). See docs/tales.md.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

# --------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------

FEMALE_NAMES: tuple[str, ...] = (
    "mia", "emma", "lily", "anna", "sara", "lucy", "ella", "zoe", "ava", "nora",
    "ruby", "chloe", "maya", "leah", "julia", "eva", "alice", "clara", "hannah", "lena",
    "nina", "olivia", "sophie", "amy", "isla", "freya", "molly", "daisy", "poppy", "ivy",
    "hazel", "luna", "stella", "iris", "jane", "kate", "laura", "tina", "wendy", "fiona",
)  # fmt: skip
MALE_NAMES: tuple[str, ...] = (
    "tom", "sam", "max", "leo", "ben", "jack", "finn", "noah", "liam", "jake",
    "luke", "owen", "adam", "ryan", "eli", "theo", "oscar", "henry", "oliver", "james",
    "peter", "paul", "mark", "alex", "dan", "evan", "hugo", "ivan", "kai", "milo",
    "nick", "omar", "otto", "rex", "ted", "tim", "victor", "walter", "zack", "ollie",
)  # fmt: skip
NAMES: tuple[str, ...] = FEMALE_NAMES + MALE_NAMES
GENDER: dict[str, str] = {n: "female" for n in FEMALE_NAMES} | {n: "male" for n in MALE_NAMES}
PRONOUN: dict[str, str] = {"female": "she", "male": "he"}
POSSESSIVE: dict[str, str] = {"female": "her", "male": "his"}
CHILD_NOUN: dict[str, str] = {"female": "girl", "male": "boy"}

ANIMALS: dict[str, str] = {  # singular -> plural
    "dog": "dogs", "cat": "cats", "bird": "birds", "fox": "foxes", "rabbit": "rabbits",
    "frog": "frogs", "duck": "ducks", "bear": "bears", "mouse": "mice", "horse": "horses",
    "pig": "pigs", "cow": "cows", "wolf": "wolves", "goat": "goats", "lion": "lions",
    "puppy": "puppies", "kitten": "kittens", "hen": "hens",
}  # fmt: skip
SCENERY: dict[str, str] = {  # singular -> plural; attractor nouns for `agreement`
    "tree": "trees", "rock": "rocks", "house": "houses", "fence": "fences", "bush": "bushes",
    "flower": "flowers", "barn": "barns", "gate": "gates", "wall": "walls", "bench": "benches",
}  # fmt: skip
OBJECT_COLOUR: dict[str, str] = {  # fixed object -> colour map (`attribute`)
    "ball": "red", "kite": "yellow", "hat": "green", "cup": "blue", "box": "brown",
    "boat": "white", "car": "black", "drum": "orange", "book": "purple", "bag": "pink",
    "shoe": "brown", "scarf": "purple", "bike": "blue", "train": "green", "doll": "pink",
    "sock": "white", "bucket": "yellow", "balloon": "red", "lamp": "orange", "blanket": "black",
    "bell": "yellow", "key": "blue", "ring": "white", "spoon": "red",
}  # fmt: skip
OBJECTS: tuple[str, ...] = tuple(OBJECT_COLOUR)
COLOURS: tuple[str, ...] = tuple(sorted(set(OBJECT_COLOUR.values())))
PLACES: tuple[str, ...] = (
    "park", "forest", "garden", "beach", "river", "lake", "farm", "school", "shop", "hill",
    "pond", "market", "zoo", "meadow", "castle", "library",
)  # fmt: skip
HOMES: tuple[str, ...] = ("house", "cottage", "village", "town", "cabin", "tent")
FAMILY: tuple[str, ...] = ("mom", "dad", "grandma", "grandpa", "aunt", "uncle")
FOODS: tuple[str, ...] = (
    "cake", "bread", "soup", "pie", "cookies", "pears", "carrots", "cheese", "honey", "rice",
)  # fmt: skip
FEELINGS: tuple[str, ...] = (
    "happy", "sad", "tired", "hungry", "sleepy", "scared", "excited", "proud", "calm", "grumpy",
)  # fmt: skip
CHILD_ADJS: tuple[str, ...] = (
    "little", "young", "kind", "brave", "clever", "shy", "funny", "curious",
)  # fmt: skip
SCENERY_ADJS: tuple[str, ...] = ("old", "big", "small", "tall", "new", "long")
SIZES: tuple[str, ...] = ("big", "small", "quiet", "pretty", "busy", "far")
WEATHER: tuple[str, ...] = ("sunny", "rainy", "cold", "warm", "windy", "snowy")
PREPOSITIONS: tuple[str, ...] = ("near", "behind", "under", "beside")
FOUND_VERBS: tuple[str, ...] = ("found", "saw", "lost", "wanted", "liked", "painted")
SAY_VERBS: tuple[str, ...] = ("said", "shouted", "whispered", "cried", "sang")
MOVE_VERBS: tuple[str, ...] = ("walked", "ran", "went", "hopped", "skipped")
NUMBERS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
COUNTABLES: tuple[str, ...] = (*ANIMALS.values(), "stars", "steps", "apples", "clouds")

# Utterances appear both inside quotes (closed by `"`) and as narration (closed by `.`).
UTTERANCES: tuple[str, ...] = (
    "the sun is warm today",
    "it is time to go home",
    "the {place} is very {size}",
    "i want to play with the {obj}",
    "look at all the {animals}",
    "we love the {cobj}",
    "the stars are bright tonight",
    "today is a good day",
    "my {animal} is {feeling}",
    "i can see the {place}",
)

# --------------------------------------------------------------------------------------------
# Story state and slots
# --------------------------------------------------------------------------------------------


@dataclass
class _Character:
    name: str

    @property
    def gender(self) -> str:
        return GENDER[self.name]


@dataclass(frozen=True)
class Mark:
    """Position ``index`` of a story holds the unique next token of ``behaviour``."""

    behaviour: str
    index: int


@dataclass
class _Builder:
    rng: random.Random
    main: _Character
    friend: _Character | None = None
    subject: _Character | None = None
    obj: str = "ball"
    tokens: list[str] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def add(self, *words: str) -> None:
        self.tokens.extend(words)

    def add_marked(self, word: str, behaviour: str) -> None:
        self.marks.append(Mark(behaviour, len(self.tokens)))
        self.tokens.append(word)

    def pick(self, words: Sequence[str]) -> str:
        return self.rng.choice(words)

    def character(self) -> _Character:
        """Main character, or the friend (if any) half of the time."""
        if self.friend is not None and self.rng.random() < 0.5:
            return self.friend
        return self.main

    def slot(self, name: str) -> _Slot:
        return SLOTS[name][0]


_Slot = Callable[[_Builder], None]


def _word(words: Sequence[str]) -> _Slot:
    return lambda b: b.add(b.pick(words))


def _subj(b: _Builder) -> None:
    """Subject NP: a name, or a recall `the girl named mia` / `the friend called tom`."""
    who = b.character()
    b.subject = who
    if who is b.main and b.rng.random() < 0.2:
        b.add("the")
        _named_recall(b)
    elif who is b.friend and b.rng.random() < 0.4:
        b.add("the", "friend", "called")
        _friend_recall(b)
    else:
        b.add(who.name)


def _name_any(b: _Builder) -> None:
    who = b.character()
    b.subject = who
    b.add(who.name)


def _main(b: _Builder) -> None:
    b.subject = b.main
    b.add(b.main.name)


def _friend(b: _Builder) -> None:
    assert b.friend is not None
    b.subject = b.friend
    b.add(b.friend.name)


def _other(b: _Builder) -> None:
    """The character that is not the current subject."""
    assert b.friend is not None
    b.add((b.friend if b.subject is b.main else b.main).name)


def _intro_named(b: _Builder) -> None:
    b.subject = b.main
    b.add(CHILD_NOUN[b.main.gender], "named", b.main.name)


def _named_recall(b: _Builder) -> None:
    b.subject = b.main
    b.add(CHILD_NOUN[b.main.gender], "named")
    b.add_marked(b.main.name, "induction")


def _friend_recall(b: _Builder) -> None:
    assert b.friend is not None
    b.add_marked(b.friend.name, "induction")


def _pron(b: _Builder) -> None:
    assert b.subject is not None
    b.add(PRONOUN[b.subject.gender])


def _poss(b: _Builder) -> None:
    assert b.subject is not None
    b.add(POSSESSIVE[b.subject.gender])


def _obj(b: _Builder) -> None:
    b.obj = b.pick(OBJECTS)
    b.add(b.obj)


def _same_obj(b: _Builder) -> None:
    b.add(b.obj)


def _colour(b: _Builder) -> None:
    b.add(OBJECT_COLOUR[b.obj])


def _cobj(b: _Builder) -> None:
    """A coloured object, always with its fixed colour: `red ball`."""
    b.obj = b.pick(OBJECTS)
    b.add(OBJECT_COLOUR[b.obj], b.obj)


def _count(b: _Builder) -> None:
    """`five , six , seven`: numbers from the third on are `count` probe points."""
    length = b.rng.randint(3, 6)
    start = b.rng.randint(0, len(NUMBERS) - length)
    for k in range(length):
        if k:
            b.add(",")
        word = NUMBERS[start + k]
        if k >= 2:
            b.add_marked(word, "count")
        else:
            b.add(word)


def _agreement(b: _Builder) -> None:
    """`dogs near the old tree is`: verb agrees with the head; incongruent ones are probes."""
    head_plural = b.rng.random() < 0.5
    attractor_plural = b.rng.random() < 0.5
    head = b.pick(tuple(ANIMALS))
    b.add(ANIMALS[head] if head_plural else head, b.pick(PREPOSITIONS), "the")
    if b.rng.random() < 0.5:
        b.add(b.pick(SCENERY_ADJS))
    pool = SCENERY if b.rng.random() < 0.6 else ANIMALS
    attractor = b.pick(tuple(pool))
    b.add(pool[attractor] if attractor_plural else attractor)
    verb = "are" if head_plural else "is"
    if head_plural != attractor_plural:
        b.add_marked(verb, "agreement")
    else:
        b.add(verb)


def _utterance(b: _Builder) -> None:
    _expand(b, b.pick(UTTERANCES))


def _plain(word: str) -> _Slot:
    return lambda b: b.add(word)


_AGREEMENT_WORDS = (
    *ANIMALS, *ANIMALS.values(), *SCENERY, *SCENERY.values(), *PREPOSITIONS, *SCENERY_ADJS,
    "the", "is", "are",
)  # fmt: skip

SLOTS: dict[str, tuple[_Slot, tuple[str, ...]]] = {
    # name -> (slot function, every word it can emit)
    "subj": (_subj, (*NAMES, "the", "girl", "boy", "named", "friend", "called")),
    "name_any": (_name_any, NAMES),
    "main": (_main, NAMES),
    "friend": (_friend, NAMES),
    "other": (_other, NAMES),
    "intro_named": (_intro_named, (*NAMES, "girl", "boy", "named")),
    "named_recall": (_named_recall, (*NAMES, "girl", "boy", "named")),
    "friend_recall": (_friend_recall, NAMES),
    "pron": (_pron, tuple(PRONOUN.values())),
    "poss": (_poss, tuple(POSSESSIVE.values())),
    "obj": (_obj, OBJECTS),
    "same_obj": (_same_obj, OBJECTS),
    "colour": (_colour, COLOURS),
    "cobj": (_cobj, (*COLOURS, *OBJECTS)),
    "count": (_count, (*NUMBERS, ",")),
    "agreement": (_agreement, _AGREEMENT_WORDS),
    "utterance": (_utterance, ()),  # words come from UTTERANCES
    "close_quote": (_plain('"'), ('"',)),
    "stop": (_plain("."), (".",)),
    "place": (_word(PLACES), PLACES),
    "home": (_word(HOMES), HOMES),
    "family": (_word(FAMILY), FAMILY),
    "food": (_word(FOODS), FOODS),
    "feeling": (_word(FEELINGS), FEELINGS),
    "cadj": (_word(CHILD_ADJS), CHILD_ADJS),
    "size": (_word(SIZES), SIZES),
    "weather": (_word(WEATHER), WEATHER),
    "found": (_word(FOUND_VERBS), FOUND_VERBS),
    "say": (_word(SAY_VERBS), SAY_VERBS),
    "move": (_word(MOVE_VERBS), MOVE_VERBS),
    "animal": (_word(tuple(ANIMALS)), tuple(ANIMALS)),
    "animals": (_word(tuple(ANIMALS.values())), tuple(ANIMALS.values())),
    "countables": (_word(COUNTABLES), COUNTABLES),
}

_SLOT_RE = re.compile(r"^\{(\w+)(?::(\w+))?\}$")


def _expand(b: _Builder, template: str) -> None:
    for part in template.split(" "):
        match = _SLOT_RE.match(part)
        if match is None:
            b.add(part)
            continue
        slot, behaviour = match.groups()
        start = len(b.tokens)
        b.slot(slot)(b)
        if behaviour is not None:
            assert len(b.tokens) == start + 1, f"marked slot {slot} must emit one token"
            b.marks.append(Mark(behaviour, start))


# --------------------------------------------------------------------------------------------
# Sentence templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A sentence template (see the module docstring) and its sampling weight."""

    text: str
    weight: float = 1.0

    @property
    def needs_friend(self) -> bool:
        return any(s in self.text for s in ("{friend", "{other}"))


INTROS: tuple[Template, ...] = (
    Template("once upon a time , a {cadj} {intro_named} lived in a {home} ."),
    Template("long ago , a {cadj} {intro_named} lived near the {place} ."),
    Template("one {weather} morning , a {cadj} {intro_named} woke up early ."),
    Template("a {cadj} {intro_named} lived with {poss} {family} in a small {home} ."),
)
FRIEND_INTROS: tuple[Template, ...] = (
    Template("{main} had a friend called {friend} ."),
    Template("one day , {main} met a new friend called {friend} ."),
    Template("{main} and {poss} best friend called {friend} lived in the same {home} ."),
)
BODY: tuple[Template, ...] = (
    # pronoun: the pronoun after `there` / `so` / `then` / `because` is the subject's
    Template("{subj} {move} to the {place} , and there {pron:pronoun} saw a {animal} .", 1.3),
    Template("{subj} was very {feeling} , so {pron:pronoun} ate some {food} .", 1.3),
    Template("{subj} played in the {place} all day , and then {pron:pronoun} went home .", 1.3),
    Template("{subj} smiled at the {animal} because {pron:pronoun} was {feeling} .", 1.3),
    Template("{subj} ran after the {animals} , and then {pron:pronoun} sat down .", 0.8),
    # induction: copy the name that followed `girl named` / `friend called` earlier
    Template("everyone in the {place} liked the {named_recall} .", 1.2),
    Template("{main} played with {poss} friend called {friend_recall} .", 0.8),
    Template("{main} and {poss} friend called {friend_recall} went to the {place} together .", 0.8),
    # quote: utterances close with `"` inside quotes and with `.` outside
    Template('{subj} {say} , " {utterance} {close_quote:quote} .', 1.2),
    Template('" {utterance} {close_quote:quote} , {say} {name_any} .', 0.8),
    Template("{utterance} {stop:quote}", 1.6),
    # count
    Template("{subj} counted the {countables} : {count} .", 1.5),
    # attribute: every object has one colour
    Template("{subj} {found} a {obj} in the {place} . the {same_obj} was {colour:attribute} ."),
    Template("the {obj} that {name_any} {found} was {colour:attribute} .", 1.0),
    Template("{subj} had a {obj} , and the {same_obj} was {colour:attribute} .", 0.8),
    # agreement
    Template("the {agreement} {feeling} .", 3.5),
    # filler
    Template("{subj} {found} a {cobj} near the {place} .", 0.6),
    Template("the {animal} {move} to the {place} .", 0.5),
    Template("it was a {weather} day .", 0.4),
    Template("{subj} gave the {cobj} to {other} .", 0.5),
    Template("{subj} took {poss} {animal} to the {place} .", 0.5),
    Template("{name_any} and {other} played with a {cobj} .", 0.4),
)
ENDINGS: tuple[Template, ...] = (
    Template("the end ."),
    Template("and they all lived happily ever after ."),
    Template("that night , {subj} went to bed , and then {pron:pronoun} dreamed of the {place} ."),
    Template("{subj} was very {feeling} that day ."),
)


def _template_words(text: str, slots: Mapping[str, tuple[_Slot, tuple[str, ...]]]) -> set[str]:
    words: set[str] = set()
    for part in text.split(" "):
        match = _SLOT_RE.match(part)
        words.update(slots[match.group(1)][1] if match else (part,))
    return words


# --------------------------------------------------------------------------------------------
# Grammar v2: the same lexicon and vocabulary, with the v1 shortcuts broken (docs/tales.md)
# --------------------------------------------------------------------------------------------

CUE_NOUNS: tuple[str, ...] = ("girl", "boy", "friend")
CUE_VERBS: tuple[str, ...] = ("named", "called")


@dataclass
class _BuilderV2(_Builder):
    """v2 story state: ``main`` is the first-introduced character, ``friend`` the second.

    Each character has its own introduction cue ``(noun, verb)`` (``girl named``, ``friend
    called``, ...; the nouns differ within a story), and one of them, chosen independently of
    order and cue, is the protagonist: the subject of 55% of the sentences.
    """

    cues: dict[str, tuple[str, str]] = field(default_factory=dict)
    protagonist: _Character | None = None

    def character(self) -> _Character:
        """The protagonist 55% of the time, else the other character (if any)."""
        assert self.protagonist is not None
        if self.friend is None or self.rng.random() < 0.55:
            return self.protagonist
        return self.friend if self.protagonist is self.main else self.main

    def slot(self, name: str) -> _Slot:
        return SLOTS_V2[name][0]

    def cue(self, who: _Character, *, marked: bool) -> None:
        """`girl named mia` (the name marked as an `induction` probe point if ``marked``)."""
        self.add(*self.cues[who.name])
        if marked:
            self.add_marked(who.name, "induction")
        else:
            self.add(who.name)


def _subj_v2(b: _Builder) -> None:
    """Subject NP: a name, or (30%) a recall of the character's cue `the friend called tom`."""
    assert isinstance(b, _BuilderV2)
    who = b.character()
    b.subject = who
    if b.rng.random() < 0.3:
        b.add("the")
        b.cue(who, marked=True)
    else:
        b.add(who.name)


def _intro_first(b: _Builder) -> None:
    assert isinstance(b, _BuilderV2)
    b.subject = b.main
    b.cue(b.main, marked=False)


def _intro_second(b: _Builder) -> None:
    assert isinstance(b, _BuilderV2) and b.friend is not None
    b.subject = b.friend
    b.cue(b.friend, marked=False)


def _recall(b: _Builder) -> None:
    """Either character (uniformly) by its cue: `girl named mia`; the name is a probe point."""
    assert isinstance(b, _BuilderV2)
    who = b.main if b.friend is None or b.rng.random() < 0.5 else b.friend
    b.subject = who
    b.cue(who, marked=True)


def _count_v2(b: _Builder) -> None:
    """A count of 3-6 numbers going up or down by one; numbers from the third on are probes."""
    length = b.rng.randint(3, 6)
    step = b.rng.choice((1, -1))
    start = b.rng.randint(0, len(NUMBERS) - length)
    if step < 0:
        start += length - 1
    for k in range(length):
        if k:
            b.add(",")
        word = NUMBERS[start + step * k]
        if k >= 2:
            b.add_marked(word, "count")
        else:
            b.add(word)


def _agreement_v2(b: _Builder) -> None:
    """`the tree near the dogs is`: as v1, but the head is an animal or a scenery noun."""
    head_plural = b.rng.random() < 0.5
    attractor_plural = b.rng.random() < 0.5
    pool = SCENERY if b.rng.random() < 0.5 else ANIMALS
    head = b.pick(tuple(pool))
    b.add(pool[head] if head_plural else head, b.pick(PREPOSITIONS), "the")
    if b.rng.random() < 0.5:
        b.add(b.pick(SCENERY_ADJS))
    pool = SCENERY if b.rng.random() < 0.5 else ANIMALS
    attractor = b.pick(tuple(pool))
    b.add(pool[attractor] if attractor_plural else attractor)
    verb = "are" if head_plural else "is"
    if head_plural != attractor_plural:
        b.add_marked(verb, "agreement")
    else:
        b.add(verb)


def _distractor(b: _Builder, *, coloured: bool) -> None:
    """Another object with another colour than ``b.obj``; ``b.obj`` is kept."""
    other = b.pick(tuple(o for o in OBJECTS if OBJECT_COLOUR[o] != OBJECT_COLOUR[b.obj]))
    b.add(*((OBJECT_COLOUR[other], other) if coloured else (other,)))


def _maybe_coloured_distractor(b: _Builder) -> None:
    _distractor(b, coloured=b.rng.random() < 0.5)


def _coloured_distractor(b: _Builder) -> None:
    _distractor(b, coloured=True)


_CUE_WORDS = (*NAMES, *CUE_NOUNS, *CUE_VERBS)

SLOTS_V2: dict[str, tuple[_Slot, tuple[str, ...]]] = {
    **SLOTS,
    "subj": (_subj_v2, ("the", *_CUE_WORDS)),
    "intro_first": (_intro_first, _CUE_WORDS),
    "intro_second": (_intro_second, _CUE_WORDS),
    "recall": (_recall, _CUE_WORDS),
    "first": (_main, NAMES),
    "count": (_count_v2, (*NUMBERS, ",")),
    "agreement": (_agreement_v2, _AGREEMENT_WORDS),
    "prep": (_word(PREPOSITIONS), PREPOSITIONS),
    "distractor": (_maybe_coloured_distractor, (*COLOURS, *OBJECTS)),
    "cdistractor": (_coloured_distractor, (*COLOURS, *OBJECTS)),
}

INTROS_V2: tuple[Template, ...] = (
    Template("once upon a time , a {cadj} {intro_first} lived in a {home} ."),
    Template("long ago , a {cadj} {intro_first} lived near the {place} ."),
    Template("one {weather} morning , a {cadj} {intro_first} woke up early ."),
    Template("a {cadj} {intro_first} lived with {poss} {family} in a small {home} ."),
)
SECOND_INTROS_V2: tuple[Template, ...] = (
    Template("one day , {first} met a {cadj} {intro_second} ."),
    Template("{first} played with a {cadj} {intro_second} in the {place} ."),
    Template("{first} and a {intro_second} lived in the same {home} ."),
)
BODY_V2: tuple[Template, ...] = (
    # pronoun: as v1, but the subject is the protagonist (first or second character) 55%
    Template("{subj} {move} to the {place} , and there {pron:pronoun} saw a {animal} .", 1.3),
    Template("{subj} was very {feeling} , so {pron:pronoun} ate some {food} .", 1.3),
    Template("{subj} played in the {place} all day , and then {pron:pronoun} went home .", 1.3),
    Template("{subj} smiled at the {animal} because {pron:pronoun} was {feeling} .", 1.3),
    Template("{subj} ran after the {animals} , and then {pron:pronoun} sat down .", 0.8),
    # induction: either character by its own cue; no character is named in the sentence
    Template("everyone in the {place} liked the {recall} .", 1.8),
    Template("the {animal} played with the {recall} .", 1.2),
    Template("{family} smiled at the {recall} .", 1.2),
    # quote: quotes that span a `.`, and narration after a closed quote in one sentence
    Template('{subj} {say} , " {utterance} {close_quote:quote} .', 1.0),
    Template('" {utterance} {close_quote:quote} , {say} {name_any} .', 0.6),
    Template("{utterance} {stop:quote}", 1.4),
    Template('{subj} {say} , " {family} . {utterance} {close_quote:quote} .', 0.8),
    Template('" {utterance} {close_quote:quote} , {say} {name_any} , and {utterance} {stop:quote}',
             0.8),
    # count: up or down
    Template("{subj} counted the {countables} : {count} .", 1.5),
    # attribute: distractor objects of another colour right before `was`
    Template("{subj} {found} a {obj} in the {place} . the {same_obj} was {colour:attribute} .",
             0.8),
    Template("the {obj} that {name_any} {found} was {colour:attribute} .", 0.7),
    Template("{subj} had a {obj} , and the {same_obj} was {colour:attribute} .", 0.6),
    Template("the {obj} {prep} the {distractor} was {colour:attribute} .", 0.9),
    Template("{subj} {found} a {obj} and a {cdistractor} . the {same_obj} was "
             "{colour:attribute} .", 0.6),
    # agreement
    Template("the {agreement} {feeling} .", 4.5),  # v1: 3.5 (the other v2 templates dilute it)
    # filler
    Template("{subj} {found} a {cobj} near the {place} .", 0.6),
    Template("the {animal} {move} to the {place} .", 0.5),
    Template("it was a {weather} day .", 0.4),
    Template("{subj} gave the {cobj} to {other} .", 0.5),
    Template("{subj} took {poss} {animal} to the {place} .", 0.5),
    Template("{name_any} and {other} played with a {cobj} .", 0.4),
    Template("{name_any} and {other} went to the {place} together .", 0.3),
    Template("{subj} liked the {place} best .", 0.3),
)
ENDINGS_V2 = ENDINGS


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Story:
    """A generated story: its tokens and the probe points planted in it."""

    tokens: tuple[str, ...]
    marks: tuple[Mark, ...]

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


Grammar = Literal["v1", "v2"]
GRAMMARS: tuple[Grammar, ...] = ("v1", "v2")
DEFAULT_GRAMMAR: Grammar = "v2"
"""v2 (the shipped run's grammar) contradicts every shortcut of v1 in training text (docs/tales.md);
v1 stays available, bit for bit, as ``grammar="v1"``."""


class TalesCorpus:
    """Deterministic, unbounded stream of stories for one ``seed`` and ``grammar``.

    Story ``i`` depends only on ``(seed, grammar, i)``, so any story can be regenerated alone.
    """

    MIN_TOKENS = 30
    MAX_TOKENS = 110

    def __init__(self, seed: int, grammar: Grammar = DEFAULT_GRAMMAR) -> None:
        if grammar not in GRAMMARS:
            raise ValueError(f"unknown tales grammar {grammar!r}; known: {', '.join(GRAMMARS)}")
        self.seed = seed
        self.grammar: Grammar = grammar

    def story(self, index: int) -> Story:
        """Generate story ``index`` with its probe marks."""
        if self.grammar == "v2":
            return self._story_v2(index)
        rng = random.Random(f"tales/{self.seed}/{index}")
        main = _Character(rng.choice(NAMES))
        b = _Builder(rng=rng, main=main)
        _expand(b, rng.choice(INTROS).text)
        if rng.random() < 0.75:
            # Mostly of the other gender, so pronouns must track the latest name.
            same = rng.random() < 0.3
            pool = [n for n in NAMES if n != main.name and (GENDER[n] == main.gender) == same]
            b.friend = _Character(rng.choice(pool))
            _expand(b, rng.choice(FRIEND_INTROS).text)
        return self._finish(b, BODY, ENDINGS)

    def _story_v2(self, index: int) -> Story:
        rng = random.Random(f"tales/v2/{self.seed}/{index}")
        first = _Character(rng.choice(NAMES))
        second: _Character | None = None
        cues = {first.name: (CHILD_NOUN[first.gender] if rng.random() < 0.5 else "friend",
                             rng.choice(CUE_VERBS))}
        if rng.random() < 0.85:  # v1: 0.75; one-character stories agree with every shortcut
            same = rng.random() < 0.45  # v1: 0.3; same-gender pairs defeat `girl` -> a girl
            pool = [n for n in NAMES if n != first.name and (GENDER[n] == first.gender) == same]
            second = _Character(rng.choice(pool))
            # Cue nouns differ within a story: two girls are a `girl` and a `friend`.
            if cues[first.name][0] == "friend" or (not same and rng.random() < 0.5):
                noun = CHILD_NOUN[second.gender]
            else:
                noun = "friend"
            # Mostly the same verb, so `named` / `called` alone does not tell them apart.
            verb = cues[first.name][1]
            if rng.random() < 0.25:
                verb = CUE_VERBS[1 - CUE_VERBS.index(verb)]
            cues[second.name] = (noun, verb)
        protagonist = first if second is None or rng.random() < 0.5 else second
        b = _BuilderV2(rng=rng, main=first, friend=second, cues=cues, protagonist=protagonist)
        _expand(b, rng.choice(INTROS_V2).text)
        if second is not None:
            _expand(b, rng.choice(SECOND_INTROS_V2).text)
        return self._finish(b, BODY_V2, ENDINGS_V2)

    def _finish(
        self, b: _Builder, body_templates: Sequence[Template], endings: Sequence[Template]
    ) -> Story:
        """Body sentences up to a random length target, then (usually) an ending."""
        rng = b.rng
        target = rng.randint(45, self.MAX_TOKENS)
        body = [t for t in body_templates if b.friend is not None or not t.needs_friend]
        weights = [t.weight for t in body]
        n_body = 0
        for _ in range(60):
            sentence = self._render(b, rng.choices(body, weights)[0])
            new_len = len(b.tokens) + len(sentence.tokens)
            if new_len > self.MAX_TOKENS:
                continue
            if new_len > target and n_body >= 2 and len(b.tokens) >= self.MIN_TOKENS:
                break
            self._append(b, sentence)
            n_body += 1
        if rng.random() < 0.7:
            sentence = self._render(b, rng.choice(endings))
            if len(b.tokens) + len(sentence.tokens) <= self.MAX_TOKENS:
                self._append(b, sentence)
        return Story(tuple(b.tokens), tuple(b.marks))

    @staticmethod
    def _render(b: _Builder, template: Template) -> _Builder:
        """Render one sentence on a scratch copy of the builder state."""
        scratch = replace(b, tokens=[], marks=[])
        _expand(scratch, template.text)
        return scratch

    @staticmethod
    def _append(b: _Builder, sentence: _Builder) -> None:
        offset = len(b.tokens)
        b.marks.extend(Mark(m.behaviour, m.index + offset) for m in sentence.marks)
        b.tokens.extend(sentence.tokens)
        b.subject, b.obj = sentence.subject, sentence.obj

    def annotated(self) -> Iterator[Story]:
        """Unbounded iterator of annotated stories 0, 1, 2, ..."""
        index = 0
        while True:
            yield self.story(index)
            index += 1

    def stories(self) -> Iterator[str]:
        """Unbounded iterator of story strings (tokens joined by single spaces)."""
        return (s.text for s in self.annotated())

    @staticmethod
    def vocabulary(grammar: Grammar = DEFAULT_GRAMMAR) -> list[str]:
        """Every token ``grammar`` can emit, sorted (derived from templates and word lists).

        v2 emits exactly v1's words, so one tokenizer serves both grammars.
        """
        if grammar == "v2":
            templates, slots = (*INTROS_V2, *SECOND_INTROS_V2, *BODY_V2, *ENDINGS_V2), SLOTS_V2
        else:
            templates, slots = (*INTROS, *FRIEND_INTROS, *BODY, *ENDINGS), SLOTS
        words: set[str] = set()
        for template in templates:
            words |= _template_words(template.text, slots)
        for utterance in UTTERANCES:
            words |= _template_words(utterance, slots)
        return sorted(words)


# --------------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A story prefix whose next token is determined by the grammar.

    ``behaviour`` is the probe family: a behaviour's name, or ``<name>_shortcut``.
    """

    prompt: str
    expected: str
    behaviour: str
    seed: int
    story_index: int


_NUMBER_INDEX = {w: i for i, w in enumerate(NUMBERS)}
_FILLED = {
    "place": set(PLACES), "size": set(SIZES), "obj": set(OBJECTS), "animal": set(ANIMALS),
    "animals": set(ANIMALS.values()), "feeling": set(FEELINGS),
}  # fmt: skip


_ATTRACTORS = {*ANIMALS, *ANIMALS.values(), *SCENERY, *SCENERY.values()}


def _sentence(prefix: Sequence[str]) -> list[str]:
    """Tokens of the current (unfinished) sentence."""
    tokens = list(prefix)
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] == ".":
            return tokens[i + 1 :]
    return tokens


def _is_utterance(tokens: Sequence[str]) -> bool:
    for utterance in UTTERANCES:
        parts = utterance.replace("{cobj}", "{colour} {obj}").split(" ")
        if len(parts) != len(tokens):
            continue
        ok = True
        for part, token in zip(parts, tokens, strict=True):
            match = _SLOT_RE.match(part)
            if match is None:
                ok = part == token
            elif match.group(1) == "colour":
                ok = token in COLOURS
            else:
                ok = token in _FILLED[match.group(1)]
            if not ok:
                break
        if ok:
            return True
    return False


def predict_pronoun(prefix: Sequence[str]) -> str | None:
    """After `there`/`so`/`then`/`because`: the pronoun of the most recently named character."""
    if not prefix or prefix[-1] not in ("there", "so", "then", "because"):
        return None
    for token in reversed(prefix):
        if token in GENDER:
            return PRONOUN[GENDER[token]]
    return None


def predict_agreement(prefix: Sequence[str]) -> str | None:
    """`the <noun> <prep> the [adj] <noun>` at sentence start: `is`/`are` by the first noun."""
    s = _sentence(prefix)
    if len(s) not in (5, 6) or s[0] != "the" or s[2] not in PREPOSITIONS or s[3] != "the":
        return None
    if (len(s) == 6 and s[4] not in SCENERY_ADJS) or s[-1] not in _ATTRACTORS:
        return None
    if s[1] in ANIMALS:
        return "is"
    if s[1] in ANIMALS.values():
        return "are"
    return None


def predict_induction(prefix: Sequence[str]) -> str | None:
    """After `named`/`called`: if the last two tokens occurred before, what followed them."""
    if len(prefix) < 2 or prefix[-1] not in ("named", "called"):
        return None
    bigram = (prefix[-2], prefix[-1])
    for i in range(len(prefix) - 3):
        if (prefix[i], prefix[i + 1]) == bigram:
            return prefix[i + 2]
    return None


def predict_quote(prefix: Sequence[str]) -> str | None:
    """A complete utterance closes with `"` inside an open quote, else with `.`."""
    s = _sentence(prefix)
    if s.count('"') % 2 == 1:
        tail = s[len(s) - 1 - s[::-1].index('"') + 1 :]
        return '"' if _is_utterance(tail) else None
    return "." if _is_utterance(s) else None


def predict_count(prefix: Sequence[str]) -> str | None:
    """After `<number> ,`: the next number."""
    if len(prefix) < 2 or prefix[-1] != "," or prefix[-2] not in _NUMBER_INDEX:
        return None
    return NUMBERS[_NUMBER_INDEX[prefix[-2]] + 1]


def predict_attribute(prefix: Sequence[str]) -> str | None:
    """After `the <object> was` or `the <object> that <name> <verb> was`: the object's colour."""
    if not prefix or prefix[-1] != "was":
        return None
    if len(prefix) >= 3 and prefix[-3] == "the" and prefix[-2] in OBJECT_COLOUR:
        return OBJECT_COLOUR[prefix[-2]]
    if len(prefix) >= 6 and prefix[-6] == "the" and prefix[-4] == "that":
        return OBJECT_COLOUR.get(prefix[-5])
    return None


@dataclass(frozen=True)
class Shortcut:
    """A cue that could stand in for a behaviour's rule (position, frequency, an adjacent token)."""

    name: str
    description: str
    predict: Callable[[Sequence[str]], str | None] = field(repr=False)


@dataclass(frozen=True)
class Behaviour:
    """A planted behaviour: a rule whose next-token answer is known exactly.

    ``shortcuts`` (v2 only) are the heuristics the grammar was audited for; the
    ``<name>_shortcut`` probe family (:meth:`shortcut_probes`) holds the probe points where
    every one of them gives another answer than the rule.
    """

    name: str
    rule: str
    example_prompt: str
    example_expected: str
    predict: Callable[[Sequence[str]], str | None] = field(repr=False)
    grammar: Grammar = "v1"  # the grammar whose stories the probes come from
    shortcuts: tuple[Shortcut, ...] = field(default=(), repr=False)

    @property
    def shortcut_family(self) -> str | None:
        """Name of the shortcut probe family (``None`` when the behaviour lists no shortcuts)."""
        return f"{self.name}_shortcut" if self.shortcuts else None

    def probes(self, seed: int, n: int) -> list[Probe]:
        """``n`` probes from stories of ``TalesCorpus(seed, grammar)``, one per story."""
        return self._draw(seed, n, self.name, None)

    def shortcut_probes(self, seed: int, n: int) -> list[Probe]:
        """``n`` probes (one per story) on which every shortcut disagrees with the rule."""
        if self.shortcut_family is None:
            raise ValueError(f"behaviour {self.name!r} ({self.grammar}) has no shortcut family")
        return self._draw(seed, n, self.shortcut_family, self.defeats_shortcuts)

    def defeats_shortcuts(self, prefix: Sequence[str], expected: str) -> bool:
        """Whether no shortcut predicts ``expected`` after ``prefix`` (tokens)."""
        return all(s.predict(prefix) != expected for s in self.shortcuts)

    def _draw(
        self, seed: int, n: int, family: str,
        accept: Callable[[Sequence[str], str], bool] | None,
    ) -> list[Probe]:  # fmt: skip
        corpus = TalesCorpus(seed, self.grammar)
        probes: list[Probe] = []
        index = 0
        while len(probes) < n:
            if index > 100 * n + 1000:
                raise RuntimeError(f"behaviour {family!r} is too rare to draw {n} probes")
            story = corpus.story(index)
            marks = [m for m in story.marks if m.behaviour == self.name]
            if accept is not None:
                marks = [m for m in marks
                         if accept(story.tokens[: m.index], story.tokens[m.index])]
            if marks:
                mark = random.Random(f"probe/{family}/{seed}/{index}").choice(marks)
                prompt = " ".join(story.tokens[: mark.index])
                probes.append(Probe(prompt, story.tokens[mark.index], family, seed, index))
            index += 1
        return probes


_EX_INTRO = "once upon a time , a kind girl named mia lived in a cottage ."
_EX_FRIEND = _EX_INTRO + " mia had a friend called tom ."

BEHAVIOURS_V1: dict[str, Behaviour] = {
    b.name: b
    for b in (
        Behaviour(
            "pronoun",
            "After `, and there`, `, so`, `, and then` or `because`, the pronoun (`she`/`he`) "
            "agrees with the fixed gender of the most recently named character (the subject "
            "of the sentence; 5-9 tokens lie between the name and the pronoun).",
            _EX_FRIEND + " tom walked to the park , and there",
            "he",
            predict_pronoun,
        ),
        Behaviour(
            "agreement",
            "A sentence `the <animal(s)> <prep> the [adj] <noun(s)>` continues with `is` if the "
            "head animal is singular and `are` if plural; probes use an attractor noun of the "
            "opposite number.",
            _EX_INTRO + " the dogs near the old tree",
            "are",
            predict_agreement,
        ),
        Behaviour(
            "induction",
            "`<girl|boy> named` and `friend called` introduce a character (80 possible names); "
            "when the same two tokens recur later, the next token is that name again.",
            _EX_FRIEND + " everyone in the park liked the girl named",
            "mia",
            predict_induction,
        ),
        Behaviour(
            "quote",
            'Utterances (e.g. `the sun is warm today`) end with `"` when inside an open '
            "quotation and with `.` when used as narration.",
            _EX_INTRO + ' mia said , " the sun is warm today',
            '"',
            predict_quote,
        ),
        Behaviour(
            "count",
            "A count (3-6 numbers, starting anywhere from `one` to `eighteen`) continues with "
            "the next number; probes show at least two numbers.",
            _EX_INTRO + " mia counted the ducks : five , six , seven ,",
            "eight",
            predict_count,
        ),
        Behaviour(
            "attribute",
            "Each of 24 objects has one fixed colour used everywhere; `the <object> was` (or "
            "`the <object> that <name> <verb> was`) continues with that colour.",
            _EX_INTRO + " mia found a ball in the park . the ball was",
            "red",
            predict_attribute,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Grammar v2 behaviours: the same six rules (count and quote generalised), with shortcuts
# --------------------------------------------------------------------------------------------

_NOUN_PLURAL = {n: False for n in (*ANIMALS, *SCENERY)} | {
    n: True for n in (*ANIMALS.values(), *SCENERY.values())
}
_ANIMAL_NOUNS = {*ANIMALS, *ANIMALS.values()}
_QUOTE_BOUNDARIES = (".", '"', "and")


def _names(prefix: Sequence[str]) -> list[str]:
    return [t for t in prefix if t in GENDER]


def _most_frequent_name(prefix: Sequence[str]) -> str | None:
    """The name mentioned most often (ties: the one mentioned first)."""
    names = _names(prefix)
    return max(dict.fromkeys(names), key=names.count) if names else None


def _agreement_nouns(prefix: Sequence[str]) -> tuple[str, str] | None:
    """Head and attractor of `the <noun> <prep> the [adj] <noun>` at sentence start."""
    s = _sentence(prefix)
    if len(s) not in (5, 6) or s[0] != "the" or s[2] not in PREPOSITIONS or s[3] != "the":
        return None
    if (len(s) == 6 and s[4] not in SCENERY_ADJS) or s[1] not in _NOUN_PLURAL:
        return None
    return (s[1], s[-1]) if s[-1] in _NOUN_PLURAL else None


def _verb(plural: bool) -> str:
    return "are" if plural else "is"


def predict_agreement_v2(prefix: Sequence[str]) -> str | None:
    """`the <noun> <prep> the [adj] <noun>` at sentence start: `is`/`are` by the head noun."""
    nouns = _agreement_nouns(prefix)
    return None if nouns is None else _verb(_NOUN_PLURAL[nouns[0]])


def _utterance_start(prefix: Sequence[str]) -> int | None:
    """Start of the complete utterance that ``prefix`` ends with (after `.`, `"` or `and`)."""
    start = 0
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] in _QUOTE_BOUNDARIES:
            start = i + 1
            break
    return start if start < len(prefix) and _is_utterance(prefix[start:]) else None


def predict_quote_v2(prefix: Sequence[str]) -> str | None:
    """A complete utterance closes with `"` while a quote is open (odd number of `"` so far,
    across sentences), else with `.`."""
    if _utterance_start(prefix) is None:
        return None
    return '"' if prefix.count('"') % 2 else "."


def predict_count_v2(prefix: Sequence[str]) -> str | None:
    """After `<a> , <b> ,` with b = a ± 1: the number one further in the same direction."""
    if len(prefix) < 4 or prefix[-1] != "," or prefix[-3] != ",":
        return None
    a, b = _NUMBER_INDEX.get(prefix[-4]), _NUMBER_INDEX.get(prefix[-2])
    if a is None or b is None or abs(b - a) != 1 or not 0 <= 2 * b - a < len(NUMBERS):
        return None
    return NUMBERS[2 * b - a]


def predict_attribute_v2(prefix: Sequence[str]) -> str | None:
    """After `the <object> [that <name> <verb> | <prep> the [<colour>] <object>] was`: the first
    object's colour."""
    t = list(prefix[-8:])
    if not t or t[-1] != "was":
        return None
    obj = _object_before_preposition(t)
    return OBJECT_COLOUR[obj] if obj is not None else predict_attribute(t)


def _object_before_preposition(t: Sequence[str]) -> str | None:
    """O in a prefix ending `the O <prep> the [C] O2 was` (v2's attribute form), else None."""
    for size in (7, 6):
        if len(t) >= size:
            w = t[-size:]
            if (w[0] == "the" and w[1] in OBJECT_COLOUR and w[2] in PREPOSITIONS
                    and w[3] == "the" and w[-2] in OBJECT_COLOUR
                    and (size == 6 or w[4] in COLOURS)):
                return w[1]
    return None


# Shortcuts (each predicts an answer from one cue that the rule does not use) ----------------


def _first_name(prefix: Sequence[str]) -> str | None:
    names = _names(prefix)
    return names[0] if names else None


def _recent_name(prefix: Sequence[str]) -> str | None:
    names = _names(prefix)
    return names[-1] if names else None


def _name_after_last_token(prefix: Sequence[str], *, latest: bool) -> str | None:
    """Induction on the last token alone: the name after its first (or latest) earlier use."""
    spots = range(len(prefix) - 2) if not latest else range(len(prefix) - 3, -1, -1)
    for i in spots:
        if prefix[i] == prefix[-1] and prefix[i + 1] in GENDER:
            return prefix[i + 1]
    return None


def _name_of_cue_gender(prefix: Sequence[str]) -> str | None:
    """After `girl|boy named|called`: the latest name of that gender (None after `friend`)."""
    if len(prefix) < 2 or prefix[-2] not in ("girl", "boy"):
        return None
    gender = "female" if prefix[-2] == "girl" else "male"
    names = [n for n in _names(prefix) if GENDER[n] == gender]
    return names[-1] if names else None


def _pronoun_of(name: str | None) -> str | None:
    return None if name is None else PRONOUN[GENDER[name]]


def _nearest_noun(prefix: Sequence[str]) -> str | None:
    nouns = _agreement_nouns(prefix)
    return None if nouns is None else _verb(_NOUN_PLURAL[nouns[-1]])


def _animal_noun(prefix: Sequence[str]) -> str | None:
    """Number of the latest animal noun in the phrase (v1 heads were always animals)."""
    nouns = [n for n in _agreement_nouns(prefix) or () if n in _ANIMAL_NOUNS]
    return _verb(_NOUN_PLURAL[nouns[-1]]) if nouns else None


def _quote_in_sentence(prefix: Sequence[str]) -> str | None:
    return '"' if '"' in _sentence(prefix) else "."


def _sentence_start(prefix: Sequence[str]) -> str | None:
    """`.` if the utterance begins a sentence (story start or after `.`), else `"`."""
    start = _utterance_start(prefix)
    if start is None:
        return None
    return "." if start == 0 or prefix[start - 1] == "." else '"'


def _successor(prefix: Sequence[str]) -> str | None:
    if len(prefix) < 2 or prefix[-2] not in _NUMBER_INDEX:
        return None
    i = _NUMBER_INDEX[prefix[-2]] + 1
    return NUMBERS[i] if i < len(NUMBERS) else None


def _nearest_object_colour(prefix: Sequence[str]) -> str | None:
    objects = [t for t in prefix if t in OBJECT_COLOUR]
    return OBJECT_COLOUR[objects[-1]] if objects else None


def _recent_colour(prefix: Sequence[str]) -> str | None:
    colours = [t for t in prefix if t in COLOURS]
    return colours[-1] if colours else None


SHORTCUTS: dict[str, tuple[Shortcut, ...]] = {
    "pronoun": (
        Shortcut("first_character", "the pronoun of the first-introduced character",
                 lambda p: _pronoun_of(_first_name(p))),
        Shortcut("frequent_character", "the pronoun of the most often named character",
                 lambda p: _pronoun_of(_most_frequent_name(p))),
    ),
    "agreement": (
        Shortcut("nearest_noun", "agree with the noun right before the verb", _nearest_noun),
        Shortcut("animal_noun", "agree with the latest animal noun", _animal_noun),
    ),
    "induction": (
        Shortcut("first_character", "the first-introduced character", _first_name),
        Shortcut("frequent_character", "the most often named character so far",
                 _most_frequent_name),
        Shortcut("recent_character", "the most recently named character", _recent_name),
        Shortcut("verb_first", "the name after the first earlier `named` / `called` (the "
                 "verb alone)", lambda p: _name_after_last_token(p, latest=False)),
        Shortcut("verb_latest", "the name after the latest earlier `named` / `called`",
                 lambda p: _name_after_last_token(p, latest=True)),
        Shortcut("cue_gender", "the latest name of the gender of `girl` / `boy`",
                 _name_of_cue_gender),
    ),
    "quote": (
        Shortcut("quote_in_sentence", '`"` if a `"` occurs in the current sentence',
                 _quote_in_sentence),
        Shortcut("sentence_start", '`.` if the utterance begins a sentence, else `"`',
                 _sentence_start),
    ),
    "count": (
        Shortcut("successor", "the number after the last one", _successor),
    ),
    "attribute": (
        Shortcut("nearest_object", "the colour of the latest object", _nearest_object_colour),
        Shortcut("recent_colour", "the latest colour word", _recent_colour),
    ),
}  # fmt: skip

_EX_V2_INTRO = "once upon a time , a kind boy named tom lived in a house ."
_EX_V2_PAIR = _EX_V2_INTRO + " one day , tom met a funny girl named mia ."
_EX_V2_FRIEND = (
    "long ago , a shy friend called mia lived near the lake . one day , mia met a kind boy named "
    "tom ."
)

BEHAVIOURS_V2: dict[str, Behaviour] = {
    b.name: b
    for b in (
        Behaviour(
            "pronoun",
            "After `, and there`, `, so`, `, and then` or `because`, the pronoun (`she`/`he`) "
            "agrees with the fixed gender of the most recently named character (the subject). "
            "The subject is either character, whichever was introduced first or is named most.",
            _EX_V2_FRIEND + " tom walked to the park , and there",
            "he",
            predict_pronoun,
            "v2",
            SHORTCUTS["pronoun"],
        ),
        Behaviour(
            "agreement",
            "A sentence `the <noun(s)> <prep> the [adj] <noun(s)>` (head and attractor are "
            "animals or scenery) continues with `is` if the head noun is singular and `are` "
            "if plural; probes use an attractor of the opposite number.",
            _EX_V2_INTRO + " the tree near the old dogs",
            "is",
            predict_agreement_v2,
            "v2",
            SHORTCUTS["agreement"],
        ),
        Behaviour(
            "induction",
            "Each character is introduced by its own cue bigram (`girl named`, `boy called`, "
            "`friend named`, ...; the nouns differ within a story, either character may come "
            "first); when the cue recurs, the next token is the name that followed it.",
            _EX_V2_PAIR + " everyone in the park liked the girl named",
            "mia",
            predict_induction,
            "v2",
            SHORTCUTS["induction"],
        ),
        Behaviour(
            "quote",
            'Utterances end with `"` while a quotation is open (quotes may span a `.`: '
            '`" mom . the sun is warm today "`) and with `.` as narration, also right after '
            'a closed quote in the same sentence.',
            _EX_V2_INTRO + ' tom said , " mom . the sun is warm today',
            '"',
            predict_quote_v2,
            "v2",
            SHORTCUTS["quote"],
        ),
        Behaviour(
            "count",
            "A count (3-6 numbers, up or down by one, anywhere in `one`-`twenty`) continues "
            "with the next number in its direction; probes show at least two numbers.",
            _EX_V2_INTRO + " tom counted the ducks : seven , six , five ,",
            "four",
            predict_count_v2,
            "v2",
            SHORTCUTS["count"],
        ),
        Behaviour(
            "attribute",
            "Each of 24 objects has one fixed colour used everywhere; `the <object> was`, `the "
            "<object> that <name> <verb> was` and `the <object> <prep> the [<colour>] <object> "
            "was` continue with the colour of the first object.",
            _EX_V2_INTRO + " the ball near the blue cup was",
            "red",
            predict_attribute_v2,
            "v2",
            SHORTCUTS["attribute"],
        ),
    )
}


BEHAVIOURS: dict[str, Behaviour] = BEHAVIOURS_V2 if DEFAULT_GRAMMAR == "v2" else BEHAVIOURS_V1
"""The default grammar's behaviours (those the shipped run was trained and is probed on)."""


def behaviours(grammar: Grammar = DEFAULT_GRAMMAR) -> dict[str, Behaviour]:
    """The planted behaviours of ``grammar`` (v1: no shortcut families)."""
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown tales grammar {grammar!r}; known: {', '.join(GRAMMARS)}")
    return BEHAVIOURS_V2 if grammar == "v2" else BEHAVIOURS_V1


ProbeDraw = Callable[[int, int], list[Probe]]
"""``draw(seed, n) -> probes`` of one probe family."""


def probe_families(grammar: Grammar = DEFAULT_GRAMMAR) -> dict[str, ProbeDraw]:
    """Probe family name -> ``draw(seed, n)``: each behaviour, then its shortcut family (v2)."""
    families: dict[str, ProbeDraw] = {}
    for b in behaviours(grammar).values():
        families[b.name] = b.probes
        if b.shortcut_family is not None:
            families[b.shortcut_family] = b.shortcut_probes
    return families


def attribute_object(prompt: str) -> str | None:
    """The object whose colour an `attribute` probe asks for (None if it is not one)."""
    t = prompt.split()
    if not t or t[-1] != "was":
        return None
    if (obj := _object_before_preposition(t)) is not None:  # v2: O's colour, not O2's
        return obj
    if len(t) >= 3 and t[-3] == "the" and t[-2] in OBJECT_COLOUR:
        return t[-2]
    if len(t) >= 6 and t[-6] == "the" and t[-4] == "that":
        return t[-5] if t[-5] in OBJECT_COLOUR else None
    return None


def attribute_probes_by_object(
    seed: int, n: int, grammar: Grammar = DEFAULT_GRAMMAR
) -> dict[str, list[Probe]]:
    """``n`` attribute probes of ``TalesCorpus(seed, grammar)`` grouped by object."""
    out: dict[str, list[Probe]] = {}
    for p in behaviours(grammar)["attribute"].probes(seed, n):
        obj = attribute_object(p.prompt)
        assert obj is not None, p.prompt
        out.setdefault(obj, []).append(p)
    return out
