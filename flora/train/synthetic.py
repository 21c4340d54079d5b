"""``builtin:synthetic-instruct``: a sentence about a person -> one fixed JSON record.

Prompt: ``Record: <sentence>``, e.g. ``Record: Meet Olga, a 34-year-old from Lisbon.``;
answer: exactly ``{"name":"Olga","age":34,"city":"Lisbon"}`` (compact JSON, keys in this
order). The sentence comes from one of several templates that put the three facts in
different orders, so the model has to find them, not copy positions. Success is
exact-match measurable; the base model does not know the schema (it answers in prose or
with other keys), so it starts near 0%.

Held-out prompts are disjoint from training by construction: every fifth first name (in
the sorted list) appears only in eval. The eval set is fixed (its own seed); ``--seed``
changes the training sample only.
"""

from __future__ import annotations

import json
import random

from flora.train.data import Message, Splits

SYSTEM = "Reply with the record only."
TRAIN_SIZE = 2000
EVAL_SIZE = 200
EVAL_SEED = 20_251_128

NAMES = sorted(
    [
        "Ada",
        "Aiko",
        "Alan",
        "Amara",
        "Anil",
        "Anna",
        "Arjun",
        "Astrid",
        "Ben",
        "Bruno",
        "Carla",
        "Chen",
        "Dara",
        "Diego",
        "Elena",
        "Emil",
        "Eva",
        "Farah",
        "Felix",
        "Gita",
        "Hana",
        "Hugo",
        "Ines",
        "Ivan",
        "Jamal",
        "Jana",
        "Kai",
        "Karin",
        "Lars",
        "Leila",
        "Lena",
        "Luca",
        "Maya",
        "Mei",
        "Milan",
        "Nadia",
        "Nils",
        "Noor",
        "Olga",
        "Omar",
        "Pablo",
        "Priya",
        "Quinn",
        "Rafael",
        "Rosa",
        "Sami",
        "Sara",
        "Sven",
        "Tara",
        "Theo",
        "Uma",
        "Viktor",
        "Wen",
        "Yara",
        "Yusuf",
        "Zoe",
        "Zofia",
        "Malik",
        "Ines",
        "Tomas",
    ]
)
NAMES = sorted(set(NAMES))
CITIES = [
    "Lisbon",
    "Oslo",
    "Cairo",
    "Lima",
    "Kyoto",
    "Dublin",
    "Quito",
    "Hanoi",
    "Accra",
    "Perth",
    "Lyon",
    "Porto",
    "Riga",
    "Turin",
    "Seoul",
    "Nairobi",
    "Bogota",
    "Zurich",
    "Austin",
    "Denver",
    "Krakow",
    "Malmo",
    "Tunis",
    "Dakar",
    "Leeds",
    "Graz",
    "Bergen",
    "Osaka",
    "Havana",
    "Tallinn",
]
TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "Age {age}, city {city}, name {name}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city}.",
    "Our new neighbour in {city} is {name}; {name} is {age}.",
)


def eval_names() -> list[str]:
    """Names that occur only in held-out prompts (every fifth of the sorted list)."""
    return NAMES[4::5]


def train_names() -> list[str]:
    """Names used in training prompts."""
    held = set(eval_names())
    return [n for n in NAMES if n not in held]


def make_example(rng: random.Random, names: list[str]) -> tuple[str, str]:
    """One ``(prompt, answer)`` pair drawn with ``rng``."""
    name, city, age = rng.choice(names), rng.choice(CITIES), rng.randint(18, 89)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return f"Record: {sentence}", answer


def to_messages(prompt: str, answer: str) -> list[Message]:
    """The chat form of one example (short system prompt, user prompt, answer)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def generate(n: int, seed: int, names: list[str]) -> list[list[Message]]:
    """``n`` distinct conversations from ``seed`` (same seed, same list)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[list[Message]] = []
    while len(out) < n:
        prompt, answer = make_example(rng, names)
        if prompt not in seen:
            seen.add(prompt)
            out.append(to_messages(prompt, answer))
    return out


def load_synthetic_instruct(seed: int) -> Splits:
    """2,000 training conversations from ``seed``; the fixed 200 held-out ones."""
    return Splits(
        train=generate(TRAIN_SIZE, seed, train_names()),
        eval=generate(EVAL_SIZE, EVAL_SEED, eval_names()),
    )
