"""The `tales` corpus: procedurally generated children's stories with planted behaviours.

Every story is built from sentence templates. Template text is a space-separated token list in
which ``{slot}`` expands through a slot function and ``{slot:behaviour}`` additionally marks the
single token emitted by that slot as a *probe point* of ``behaviour``: at that position the
grammar allows exactly one next token, and a probe's prompt is the story prefix just before it.

The vocabulary is derived from the template literals and word lists (never from sampling), so
``TalesCorpus.vocabulary()`` is exactly the set of tokens the grammar can emit.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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
        SLOTS[slot][0](b)
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


def _template_words(text: str) -> set[str]:
    words: set[str] = set()
    for part in text.split(" "):
        match = _SLOT_RE.match(part)
        words.update(SLOTS[match.group(1)][1] if match else (part,))
    return words


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


class TalesCorpus:
    """Deterministic, unbounded stream of stories for one ``seed``.

    Story ``i`` depends only on ``(seed, i)``, so any story can be regenerated on its own.
    """

    MIN_TOKENS = 30
    MAX_TOKENS = 110

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def story(self, index: int) -> Story:
        """Generate story ``index`` with its probe marks."""
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
        target = rng.randint(45, self.MAX_TOKENS)
        body = [t for t in BODY if b.friend is not None or not t.needs_friend]
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
            sentence = self._render(b, rng.choice(ENDINGS))
            if len(b.tokens) + len(sentence.tokens) <= self.MAX_TOKENS:
                self._append(b, sentence)
        return Story(tuple(b.tokens), tuple(b.marks))

    @staticmethod
    def _render(b: _Builder, template: Template) -> _Builder:
        """Render one sentence on a scratch copy of the builder state."""
        scratch = _Builder(b.rng, b.main, b.friend, b.subject, b.obj)
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
    def vocabulary() -> list[str]:
        """Every token the grammar can emit, sorted (derived from templates and word lists)."""
        words: set[str] = set()
        for template in (*INTROS, *FRIEND_INTROS, *BODY, *ENDINGS):
            words |= _template_words(template.text)
        for utterance in UTTERANCES:
            words |= _template_words(utterance)
        return sorted(words)


# --------------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A story prefix whose next token is determined by the grammar."""

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
class Behaviour:
    """A planted behaviour: a rule whose next-token answer is known exactly."""

    name: str
    rule: str
    example_prompt: str
    example_expected: str
    predict: Callable[[Sequence[str]], str | None] = field(repr=False)

    def probes(self, seed: int, n: int) -> list[Probe]:
        """``n`` probes from stories of ``TalesCorpus(seed)``, one probe point per story."""
        corpus = TalesCorpus(seed)
        probes: list[Probe] = []
        index = 0
        while len(probes) < n:
            if index > 100 * n + 1000:
                raise RuntimeError(f"behaviour {self.name!r} is too rare to draw {n} probes")
            story = corpus.story(index)
            marks = [m for m in story.marks if m.behaviour == self.name]
            if marks:
                mark = random.Random(f"probe/{self.name}/{seed}/{index}").choice(marks)
                prompt = " ".join(story.tokens[: mark.index])
                probes.append(Probe(prompt, story.tokens[mark.index], self.name, seed, index))
            index += 1
        return probes


_EX_INTRO = "once upon a time , a kind girl named mia lived in a cottage ."
_EX_FRIEND = _EX_INTRO + " mia had a friend called tom ."

BEHAVIOURS: dict[str, Behaviour] = {
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


def attribute_object(prompt: str) -> str | None:
    """The object whose colour an `attribute` probe asks for (None if it is not one)."""
    t = prompt.split()
    if len(t) >= 3 and t[-1] == "was" and t[-3] == "the" and t[-2] in OBJECT_COLOUR:
        return t[-2]
    if len(t) >= 6 and t[-1] == "was" and t[-6] == "the" and t[-4] == "that":
        return t[-5] if t[-5] in OBJECT_COLOUR else None
    return None


def attribute_probes_by_object(seed: int, n: int) -> dict[str, list[Probe]]:
    """``n`` attribute probes of ``TalesCorpus(seed)`` grouped by object."""
    out: dict[str, list[Probe]] = {}
    for p in BEHAVIOURS["attribute"].probes(seed, n):
        obj = attribute_object(p.prompt)
        assert obj is not None, p.prompt
        out.setdefault(obj, []).append(p)
    return out
