"""Multiple-choice understanding items built from templates and word lists, answered with a letter.

Two families: the topic of a short templated sentence, and which word belongs to a category.
A held-out item is a new combination (sentence halves, members, distractors, option order) of
the same patterns; the split is a hash of the item's content, so train and test never share one.
"""

from __future__ import annotations

import random
import re

from lantern.datamodules.tasks.base import (
    Example, Split, Task, TaskScore, check_lengths, check_split, generate_unique, percent, split_rng,
)

LETTERS = "ABCD"

TOPICS = {
    "sports": (("The striker", "The home team", "Our goalkeeper", "The tennis champion", "The coach", "The young sprinter",
                "The captain"),
               ("scored twice in the final match.", "won the league title on Sunday.", "broke the record in the 100 metres.",
                "was injured during training.", "signed a new contract with the club.", "lost the semi-final on penalties.")),
    "business": (("The company", "The bank", "The startup", "The retailer", "The car maker", "The airline", "The factory"),
                 ("reported record profits this quarter.", "cut hundreds of jobs to save money.", "raised its prices again.",
                  "agreed to buy a smaller rival.", "saw its shares fall sharply.", "hired a new chief executive.")),
    "science": (("The researchers", "The lab", "A team of biologists", "The physicists", "The chemists", "The astronomers",
                 "The university team"),
                ("discovered a new species of frog.", "measured the mass of a distant star.", "published a study on cell growth.",
                 "built a more precise atomic clock.", "found water ice under the surface.", "tested a new vaccine in mice.")),
    "food": (("The chef", "The bakery", "My grandmother", "The new restaurant", "The street vendor", "The cafe",
              "The cook"),
             ("serves the best noodle soup in town.", "baked fresh bread with olives.", "added too much salt to the stew.",
              "makes a spicy tomato sauce.", "roasted the chicken with garlic and lemon.", "sells sweet cakes with cream.")),
    "weather": (("The forecast", "The storm", "The weather service", "A cold front", "The heat wave", "The wind",
                 "The morning fog"),
                ("brought heavy rain to the coast.", "warned of snow in the mountains.", "pushed temperatures above 40 degrees.",
                 "caused flooding in the valley.", "will clear by the afternoon.", "knocked down trees across the city.")),
    "music": (("The band", "The singer", "The orchestra", "The guitarist", "The choir", "The pianist", "The rapper"),
              ("released a new album on Friday.", "played a sold-out concert last night.", "recorded a song about summer.",
               "went on a world tour.", "performed a symphony by Mozart.", "wrote the lyrics in one night.")),
}

CATEGORIES = {
    "fruit": ("apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "lemon", "melon"),
    "animal": ("horse", "tiger", "rabbit", "eagle", "dolphin", "wolf", "camel", "frog", "owl", "goat"),
    "tool": ("hammer", "wrench", "saw", "screwdriver", "drill", "pliers", "shovel", "chisel", "axe", "rake"),
    "vehicle": ("bus", "truck", "bicycle", "train", "tractor", "scooter", "van", "taxi", "tram", "motorcycle"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "grey", "violet"),
    "musical instrument": ("violin", "drum", "flute", "trumpet", "piano", "cello", "harp", "guitar", "clarinet", "banjo"),
    "body part": ("elbow", "knee", "shoulder", "ankle", "wrist", "finger", "chin", "thumb", "ear", "neck"),
    "piece of furniture": ("chair", "table", "sofa", "wardrobe", "bed", "desk", "shelf", "stool", "bench", "dresser"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw(rng: random.Random) -> tuple:
    if rng.random() < 0.5:
        topic = rng.choice(sorted(TOPICS))
        subjects, predicates = TOPICS[topic]
        sentence = f"{rng.choice(subjects)} {rng.choice(predicates)}"
        labels = [topic] + rng.sample([t for t in sorted(TOPICS) if t != topic], 3)
        rng.shuffle(labels)
        return ("topic", sentence, tuple(labels), labels.index(topic))
    category = rng.choice(sorted(CATEGORIES))
    others = rng.sample([c for c in sorted(CATEGORIES) if c != category], 3)
    options = [rng.choice(CATEGORIES[category])] + [rng.choice(CATEGORIES[c]) for c in others]
    answer = options[0]
    rng.shuffle(options)
    return ("category", category, tuple(options), options.index(answer))


def _example(item: tuple, split: str, index: int) -> Example:
    kind, subject, options, answer = item
    listed = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    if kind == "topic":
        question = f'What is the topic of this sentence? "{subject}"'
    else:
        question = f"Which of these is {_article(subject)} {subject}?"
    prompt = f"{question}\n{listed}\nAnswer with the letter."
    letter = LETTERS[answer]
    return Example(f"nlu-{split}-{index}", prompt, letter, {"answer": letter, "choices": list(options)}, kind)


_STATED = re.compile(r"(?i:answer)(?:\s+is)?\s*[:\-]?\s*\(?([A-D])\b")
# "A" is also an article: a leading A counts only when punctuation or the end of a line follows it.
_LEADING = re.compile(r"^\W*(?:([B-D])\b|([A-D])(?:[).:,]|\s*$|\s*\n)|([A-D]) is (?:the )?(?:correct|right|answer))")
_MARKED = re.compile(r"\(([A-D])\)|\b([A-D])[).:]")


def predicted_letter(text: str, choices: list[str]) -> str | None:
    """The letter a reply picks: a stated or leading letter, else a marked one, else the first option named."""
    for pattern in (_STATED, _LEADING, _MARKED):
        match = pattern.search(text)
        if match:
            return next(g for g in match.groups() if g)
    lowered, best = text.lower(), None
    for i, choice in enumerate(choices):
        found = re.search(rf"\b{re.escape(choice.lower())}\b", lowered)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), LETTERS[i])
    return best[1] if best else None


class NLUTask(Task):
    name = "nlu"
    max_new_tokens = 8
    stop = ("\n",)
    default_test_size = 60
    default_train_size = 2000

    def examples(self, split: Split, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(self, split, n)
        size = n or (self.default_test_size if split == "test" else self.default_train_size)
        items = generate_unique(_draw, lambda it: repr(it[:2] + (sorted(it[2]),)), repr, split, size,
                                split_rng("nlu", split, seed), "nlu")
        return [_example(item, split, i) for i, item in enumerate(items)]

    def score(self, examples: list[Example], texts: list[str]) -> TaskScore:
        check_lengths(examples, texts, self.name)
        correct = [float(predicted_letter(t, ex.target["choices"]) == ex.target["answer"]) for ex, t in zip(examples, texts)]
        metrics = {"score": percent(correct)}
        for group in sorted({ex.group for ex in examples}):
            metrics[group] = percent([c for c, ex in zip(correct, examples) if ex.group == group])
        return TaskScore(correct, metrics)
