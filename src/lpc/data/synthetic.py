"""A synthetic preference benchmark with known latent preference types.

Each response is a short sequence of words. Two feature axes are read off it:

* ``tone``:   (#polite words - #blunt words) / #words
* ``detail``: (#specific words - #vague words) / #words

An annotator of type ``m`` prefers the response with the higher reward
``r_m(y) = cos(theta_m) * tone(y) + sin(theta_m) * detail(y)``, where the types'
angles are spread evenly over ``[0, conflict * pi]``. So ``conflict=0`` makes all
types identical, ``conflict=0.5`` makes the first and last type orthogonal and
``conflict=1`` makes them opposite (they disagree on every pair).

Every pair is labelled by one type. The prompt carries a source tag (``[source_m]``) with
probability ``visibility`` (``always`` = 1, ``sometimes`` = 0.5, ``never`` = 0), so a model may or may
not be able to infer the type from the prompt alone. A shown tag names the true type with probability
``tag_accuracy`` (default 1) and another type otherwise, so the prompt can be made a weak clue while
the preference itself still identifies the type. Optional Bradley-Terry noise:
``P(y1 > y2) = sigmoid((r1 - r2) / label_noise)``.

Rows have the same columns as the UltraFeedback pairs (``prompt``, ``chosen``,
``rejected``, ``source``) plus the ground truth: ``type``, the reward margin ``|r_m(y1) - r_m(y2)|``,
``noisy_label`` (the Bradley-Terry draw went against the type's own reward) and ``ceiling``: the
probability that the best possible predictor, which knows the generator and sees the prompt and both
responses but not the type, ranks the pair as labelled (Bayes' rule over the types; its mean over
an eval set is the best achievable preference accuracy). ``docs/synthetic-benchmark.md`` measures the label
noise rate (``python -m lpc.data.synthetic``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import datasets

from lpc.data import PreferenceData
from lpc.errors import require, require_number

POLITE = ["please", "kindly", "thanks", "gladly", "certainly", "warmly", "happily", "respectfully"]
BLUNT = ["just", "whatever", "obviously", "anyway", "simply", "frankly", "bluntly", "fine"]
SPECIFIC = ["because", "specifically", "namely", "exactly", "measured", "precisely", "detailed", "concretely"]
VAGUE = ["stuff", "things", "somehow", "maybe", "roughly", "kinda", "whatnot", "etc"]
TOPICS = [
    "rivers",
    "bridges",
    "gardens",
    "planets",
    "violins",
    "glaciers",
    "markets",
    "forests",
    "engines",
    "islands",
    "bakeries",
    "comets",
    "libraries",
    "harbors",
    "deserts",
    "orchards",
    "castles",
    "trains",
    "volcanoes",
    "museums",
    "lanterns",
    "canyons",
    "meadows",
    "lighthouses",
]
VERBS = ["describe", "explain", "summarize", "discuss", "review", "compare"]
FILLER = ["the", "a", "and", "of", "with", "about", "is", "are", "it", "very"]
VISIBILITY = {"always": 1.0, "sometimes": 0.5, "never": 0.0}
# Longest words first; short ones ("a", "of", "is", "it") only as whole words, not inside other text.
_WORD_RE = re.compile(
    "|".join(
        w if len(w) > 2 else rf"\b{w}\b"
        for w in sorted(set(POLITE + BLUNT + SPECIFIC + VAGUE + TOPICS + VERBS + FILLER), key=len, reverse=True)
    )
)
FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "source": datasets.Value("string"),
        "type": datasets.Value("int64"),
        "margin": datasets.Value("float64"),
        "noisy_label": datasets.Value("bool"),
        "ceiling": datasets.Value("float64"),
    }
)


def resolve_visibility(visibility: str | float) -> float:
    allowed = f"one of {tuple(sorted(VISIBILITY))} or a number in [0, 1] (the fraction of prompts tagged)"
    if isinstance(visibility, str):
        require(visibility in VISIBILITY, "data.visibility", visibility, allowed)
        return VISIBILITY[visibility]
    require_number("data.visibility", visibility, allowed, lambda v: 0.0 <= v <= 1.0)
    return float(visibility)


def type_weights(n_types: int, conflict: float) -> list[tuple[float, float]]:
    """Unit weight vectors (w_tone, w_detail) of each type, angles evenly spread on [0, conflict*pi]."""
    out = []
    for m in range(n_types):
        theta = conflict * math.pi * (m / (n_types - 1) if n_types > 1 else 0.0)
        # Snap tiny values so that conflict=1 gives exactly opposite rewards.
        c, s = math.cos(theta), math.sin(theta)
        c, s = (0.0 if abs(c) < 1e-12 else c), (0.0 if abs(s) < 1e-12 else s)
        out.append((c, s))
    return out


def features(words: list[str]) -> tuple[float, float]:
    n = max(len(words), 1)
    tone = (sum(w in POLITE for w in words) - sum(w in BLUNT for w in words)) / n
    detail = (sum(w in SPECIFIC for w in words) - sum(w in VAGUE for w in words)) / n
    return tone, detail


def reward(words: list[str], weight: tuple[float, float]) -> float:
    tone, detail = features(words)
    return weight[0] * tone + weight[1] * detail


@dataclass
class SyntheticPreferences(PreferenceData):
    """Generator of a train/eval ``DatasetDict``; the ``data=synthetic`` config instantiates it."""

    n_train: int = 2000
    n_eval: int = 256
    n_types: int = 2
    conflict: float = 0.5
    visibility: str | float = "always"
    label_noise: float = 0.0
    tag_accuracy: float = 1.0
    min_margin: float = 0.05
    min_words: int = 6
    max_words: int = 12
    name: str = "synthetic"
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        for key in ("n_train", "n_eval", "n_types"):
            require_number(f"data.{key}", getattr(self, key), "an integer >= 1", lambda n: n >= 1, integer=True)
        for key in ("conflict", "tag_accuracy"):
            require_number(f"data.{key}", getattr(self, key), "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        require_number("data.label_noise", self.label_noise, "a number >= 0", lambda v: v >= 0)
        require_number("data.min_margin", self.min_margin, "a number >= 0", lambda v: v >= 0)
        require_number("data.min_words", self.min_words, "an integer >= 1", lambda v: v >= 1, integer=True)
        require_number(
            "data.max_words", self.max_words, f"an integer >= data.min_words={self.min_words}",
            lambda v: v >= self.min_words, integer=True,
        )  # fmt: skip
        self.p_visible = resolve_visibility(self.visibility)
        self.weights = type_weights(self.n_types, float(self.conflict))
        self.sources = list(self.sources) or [f"source_{m}" for m in range(self.n_types)]
        require(len(self.sources) == self.n_types, "data.sources", self.sources, f"{self.n_types} names (one per type)")

    # -- generation ---------------------------------------------------------
    def _response(self, rng: random.Random, topic: str) -> list[str]:
        # A per-response style draws its feature words with random leanings, so
        # pairs differ along both axes independently.
        lean_tone, lean_detail = rng.random(), rng.random()
        words = []
        for _ in range(rng.randint(self.min_words, self.max_words)):
            u = rng.random()
            if u < 0.3:
                words.append(rng.choice(POLITE if rng.random() < lean_tone else BLUNT))
            elif u < 0.6:
                words.append(rng.choice(SPECIFIC if rng.random() < lean_detail else VAGUE))
            elif u < 0.8:
                words.append(topic)
            else:
                words.append(rng.choice(FILLER))
        return words

    def _p_first(self, margin: float) -> float:
        """P(the label says y1 > y2) for a type whose reward margin r(y1) - r(y2) is ``margin``."""
        if self.label_noise > 0:
            return 1.0 / (1.0 + math.exp(-margin / self.label_noise))
        return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5

    def _ceiling(self, tag_type: int | None, y1: list[str], y2: list[str], first_wins: bool) -> float:
        """P(the Bayes-optimal guess from (prompt, y1, y2) matches the label): the type posterior is the
        tag's likelihood times whether the type's margin passes ``min_margin`` (pairs are redrawn until
        the labelling type's does)."""
        margins = [reward(y1, w) - reward(y2, w) for w in self.weights]
        post = []
        for m, d in enumerate(margins):
            if tag_type is None or self.n_types == 1:
                prior = 1.0
            else:
                prior = self.tag_accuracy if m == tag_type else (1.0 - self.tag_accuracy) / (self.n_types - 1)
            post.append(prior * (abs(d) >= self.min_margin))
        total = sum(post)
        p_first = sum(w * self._p_first(d) for w, d in zip(post, margins)) / total
        # The optimal guess is the likelier order; it is right with that order's probability.
        return max(p_first, 1.0 - p_first)

    def _pair(self, rng: random.Random) -> dict:
        m = rng.randrange(self.n_types)
        topic = rng.choice(TOPICS)
        verb = rng.choice(VERBS)
        tag_type = None
        if rng.random() < self.p_visible:
            tag_type = m
            if self.n_types > 1 and self.tag_accuracy < 1.0 and rng.random() >= self.tag_accuracy:
                tag_type = rng.choice([t for t in range(self.n_types) if t != m])
        tag = f"[{self.sources[tag_type]}] " if tag_type is not None else ""
        prompt = f"{tag}Please {verb} {topic}."
        while True:
            y1, y2 = self._response(rng, topic), self._response(rng, topic)
            margin = reward(y1, self.weights[m]) - reward(y2, self.weights[m])
            if abs(margin) >= self.min_margin:
                break
        if self.label_noise > 0:
            first_wins = rng.random() < self._p_first(margin)
        else:
            first_wins = margin > 0
        chosen, rejected = (y1, y2) if first_wins else (y2, y1)
        return {
            "prompt": prompt,
            "chosen": " ".join(chosen),
            "rejected": " ".join(rejected),
            "source": self.sources[m],
            "type": m,
            "margin": abs(margin),
            "noisy_label": first_wins != (margin > 0),
            "ceiling": self._ceiling(tag_type, y1, y2, first_wins),
        }

    def generate(self, n: int, seed: int) -> datasets.Dataset:
        rng = random.Random(seed)
        rows = [self._pair(rng) for _ in range(n)]
        # Columnar, so an empty split (n=0) still has its columns.
        columns = {name: [r[name] for r in rows] for name in FEATURES}
        return datasets.Dataset.from_dict(columns, features=FEATURES)

    def __call__(self) -> datasets.DatasetDict:
        # Separate streams so the eval set does not change when n_train does.
        return datasets.DatasetDict(
            {
                "train": self.generate(self.n_train, seed=self.seed * 2 + 1),
                "eval": self.generate(self.n_eval, seed=self.seed * 2 + 2),
            }
        )


def generator_words(text: str) -> list[str]:
    """The generator's words in a (generated) text, longest match first. A small model often writes
    words without the space between them ("preciselybakeries"), which splitting on spaces would lose."""
    return _WORD_RE.findall(text.lower())


def type_rewards(text: str, n_types: int, conflict: float) -> list[float]:
    """Every type's ground-truth reward of a (generated) response, read with :func:`generator_words`."""
    words = generator_words(text)
    return [reward(words, w) for w in type_weights(n_types, conflict)]


def tokenizer_corpus() -> list[str]:
    """Text the tiny model's tokenizer is trained on: every word and tag the generator can emit."""
    words = POLITE + BLUNT + SPECIFIC + VAGUE + TOPICS + VERBS + FILLER
    lines = [" ".join(words), "Please " + " ".join(VERBS)]
    lines += [f"[source_{m}] Please {v} {t}." for m in range(16) for v in VERBS for t in TOPICS[:4]]
    lines += [" ".join(random.Random(i).sample(words, 12)) for i in range(400)]
    return lines
