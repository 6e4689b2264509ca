"""Instructions for self-distillation: conversations the target answers to make its training data.

A head learns what the target writes after the kinds of requests it will serve, so the recipe asks
for the kinds of work people give a coding assistant: explanations and advice, arithmetic word
problems worked step by step, summaries of and questions about documentation, completing, editing
and writing Python functions, translations, and follow-up questions on the model's own earlier
answer (`follow_up`). The material comes from word lists here and from the standard library
(docstrings, functions' source), drawn by a seeded generator, and no conversation shares a
64-character window with a benchmark prompt (`data.overlaps_bench`).
"""

from __future__ import annotations

import ast
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from specdecode.errors import SpecDecodeError

Conversation = list[dict[str, str]]

_LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese")
_TOPICS = (
    "how tides work",
    "the history of the printing press",
    "how vaccines train the immune system",
    "what a compiler does",
    "how bees communicate",
    "the water cycle",
    "why leaves change colour in autumn",
    "how a bicycle stays upright",
    "the causes of inflation",
    "how photosynthesis stores energy",
    "what makes a good password",
    "how maps are projected onto paper",
    "the life of a star",
    "how noise-cancelling headphones work",
    "how a hash table finds a key",
    "how public-key encryption works",
    "what garbage collection does in a programming language",
    "how GPS finds your position",
    "why the moon has phases",
    "how a refrigerator keeps food cold",
    "how the internet routes a message",
    "what recursion is",
    "how earthquakes are measured",
    "what a virtual machine is",
    "how solar panels make electricity",
    "how the heart pumps blood",
    "what version control is",
    "how a search engine ranks pages",
    "why ice floats",
    "what an operating system does",
    "how antibiotics work and why resistance develops",
    "what big-O notation means",
    "how a jet engine produces thrust",
    "how memory caches speed up a processor",
    "what a neural network learns",
    "how coffee is decaffeinated",
    "why some materials conduct electricity",
    "what regular expressions are good for",
    "how rainbows form",
    "how a thermostat controls a room's temperature",
    "what a container image is",
    "how the stock market sets prices",
    "how sound travels through air",
    "how a lighthouse lens works",
    "why cats purr",
    "how glaciers move",
    "what DNS does",
    "how batteries store energy",
    "how an elevator is counterweighted",
    "why onions make eyes water",
)
_ACTIVITIES = (
    "keeping a vegetable garden",
    "writing clear emails",
    "reviewing someone else's code",
    "saving money each month",
    "sleeping better",
    "teaching a child to read",
    "organising a small conference",
    "learning to cook at home",
    "starting to exercise after a long break",
    "keeping a remote team in touch",
    "writing documentation people read",
    "debugging a program that crashes only sometimes",
    "studying for an exam",
    "moving to a new city",
    "reducing time spent on a phone",
    "planning a road trip",
    "giving feedback to a colleague",
    "choosing a first programming language",
    "running an effective meeting",
    "negotiating a salary",
    "writing a short story",
    "learning to play the guitar",
    "packing light for a week of travel",
    "making a small website",
    "preparing a healthy lunch for work",
    "learning to draw",
    "keeping a bicycle in good repair",
    "learning to swim as an adult",
    "hosting a dinner party",
    "taking better photos with a phone",
)
_PAIRS = (
    ("TCP", "UDP"),
    ("renting", "buying a home"),
    ("SQL", "NoSQL databases"),
    ("trains", "planes for a 600 km trip"),
    ("a laptop", "a desktop computer for programming"),
    ("electric", "petrol cars"),
    ("unit tests", "integration tests"),
    ("reading on paper", "reading on a screen"),
    ("static", "dynamic typing"),
    ("a savings account", "an index fund"),
    ("tea", "coffee in the morning"),
    ("Vim", "Emacs"),
    ("a paper notebook", "a notes app"),
    ("JSON", "YAML for configuration files"),
    ("recursion", "iteration"),
)
_PEOPLE = (
    "a landlord about a broken heater",
    "a teacher asking to move a parent meeting",
    "a team announcing a new code review rule",
    "a customer whose order arrived late",
    "a colleague thanking them for their help on a project",
    "a neighbour about a noisy party next weekend",
    "a manager asking for a day off",
    "a club inviting members to its annual dinner",
)
FOLLOW_UPS = (
    "Can you give a concrete example?",
    "Could you say that again more briefly, as a bulleted list?",
    "What are the most common mistakes people make here?",
    "Can you explain the first point in more detail?",
    "How would you explain this to a ten-year-old?",
    "Is there anything you would add for a complete beginner?",
    "Thanks. What should I do first, today?",
    "Can you turn that into a short checklist?",
    "Why does that work? Explain the reasoning.",
    "What would you do differently if time were very short?",
    "Could you write a small Python example that shows it?",
    "Which of these matters most, and why?",
    "Can you check your answer once more and correct anything wrong?",
    "How could I tell whether it worked?",
    "Could you make it more formal?",
    "What are the trade-offs of doing it that way?",
)


@dataclass(frozen=True)
class Material:
    """What the standard library offers the templates."""

    documents: list[tuple[str, str]]  # (module, docstring of 300-2000 characters)
    functions: list[tuple[str, ast.FunctionDef, str]]  # (module, node, source) of 6-35 lines
    paragraphs: list[str]  # docstring paragraphs of 200-900 characters, without examples


def gather_material(sources: list[tuple[str, str]]) -> Material:
    """Documents, functions and paragraphs from (module name, source) pairs."""
    documents, functions, paragraphs = [], [], []
    for module, source in sources:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 6 <= node.end_lineno - node.lineno + 1 <= 35:
                segment = ast.get_source_segment(source, node, padded=True)
                if segment:
                    functions.append((module, node, textwrap.dedent(segment)))
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.Module)):
                text = ast.get_docstring(node)
                if not text:
                    continue
                if 300 <= len(text) <= 2000:
                    documents.append((module, text))
                paragraphs += [
                    p for p in text.split("\n\n") if 200 < len(p) < 900 and ">>>" not in p
                ]
    if not documents or not functions or not paragraphs:
        raise SpecDecodeError("the standard library gave no material for training prompts")
    return Material(documents, functions, paragraphs)


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _explain(rng: random.Random, material: Material) -> str:
    topic = rng.choice(_TOPICS)
    return rng.choice(
        [
            f"Explain {topic}.",
            f"Write a short, clear paragraph for a curious teenager about {topic}.",
            f"I never understood {topic}. Can you walk me through it?",
            f"Give me a simple explanation of {topic}, then one surprising fact about it.",
            f"In a few sentences: {topic}?",
        ]
    )


def _advice(rng: random.Random, material: Material) -> str:
    activity = rng.choice(_ACTIVITIES)
    return rng.choice(
        [
            f"Give five practical tips for {activity}.",
            f"I want to get better at {activity}. Where should I start?",
            f"What are common mistakes in {activity}, and how do I avoid them?",
            f"Make me a one-week plan for {activity}.",
        ]
    )


def _chat(rng: random.Random, material: Material) -> str:
    first, second = rng.choice(_PAIRS)
    return rng.choice(
        [
            f"What are the differences between {first} and {second}?",
            f"Should I choose {first} or {second}? Give the pros and cons of each.",
            f"Write a short, polite email to {rng.choice(_PEOPLE)}.",
            f"Write a four-line poem about {rng.choice(_TOPICS)}.",
        ]
    )


def _word_problem(rng: random.Random, material: Material) -> str:
    a, b, c = rng.randint(3, 48), rng.randint(2, 19), rng.randint(2, 9)
    problem = rng.choice(
        [
            f"A potter makes {a} bowls every day for {b} days and gives away {c} of them. "
            "How many are left?",
            f"A cyclist rides {a * c} km in {c} hours. At the same speed, how long does a "
            f"{a * b} km ride take?",
            f"What is {a} * {b} - {c} * {a}?",
            f"Solve for x: {c}x + {a} = {a + c * b}.",
            f"A box holds {b} rows of {c} eggs. How many boxes are needed for "
            f"{a * b * c + c} eggs?",
            f"Mia has {a} marbles and gives a third of them, rounded down, to Omar, who already "
            f"had {b}. How many does each have now?",
            f"A cinema has {a} rows of {b} seats and {c} rows are closed for repair. How many "
            "seats can be sold?",
            f"A runner keeps a pace of {c} minutes {b * 3} seconds per kilometre. How long does "
            f"{a} km take?",
            f"Buses leave every {c + 5} minutes, the first at 7:00. How many leave before noon?",
            f"A jar holds {a} red and {b} blue beads. What fraction of the beads is red, in "
            "lowest terms?",
            f"How many hours and minutes are {a * 37} minutes?",
            f"A printer prints {b} pages a minute. How long does a {a * b * 3} page job take?",
            f"Priya saves ${c * 5} a week. How many weeks until she can buy a ${a * 10} bike, "
            f"if she already has ${b}?",
            f"The sum of two numbers is {a + b} and their difference is {abs(a - b)}. "
            "What are the numbers?",
            f"What is {c}/{b + c} of {a * (b + c)}?",
        ]
    )
    return (
        problem
        + " "
        + rng.choice(
            [
                "Work through it step by step and put the final answer on the last line.",
                "Explain each step.",
                "Show your reasoning.",
                "Think it through carefully before answering.",
            ]
        )
    )


def _summarize(rng: random.Random, material: Material) -> str:
    module, doc = rng.choice(material.documents)
    instruction = rng.choice(
        [
            "Summarise the following documentation in two or three sentences.",
            "Give a one-paragraph summary of this module documentation.",
            "List the key points of this documentation as bullets.",
            "Explain what this documentation says, for someone new to Python.",
            "What is this module for? Summarise the text below in a few lines.",
        ]
    )
    return f'{instruction}\n\n"""\n{doc}\n"""'


def _question(rng: random.Random, material: Material) -> str:
    module, doc = rng.choice(material.documents)
    question = rng.choice(
        [
            "What problem does this module solve?",
            "Which functions or classes does the text mention, and what does each do?",
            "What should a user be careful about, according to the text?",
            "Give an example of how the module described would be used.",
            "What does the text say about errors or exceptions?",
            "Who would need this module, and why?",
        ]
    )
    return (
        "Use only the documentation below to answer.\n\n"
        f'Documentation:\n"""\n{doc}\n"""\n\nQuestion: {question}'
    )


def _complete(rng: random.Random, material: Material) -> str:
    module, node, source = rng.choice(material.functions)
    doc = ast.get_docstring(node)
    lines = source.split("\n")
    header = lines[: node.body[0].lineno - node.lineno]
    doc = doc or f"See `{module}.{node.name}` in the standard library."
    header.append(textwrap.indent(f'"""{doc}\n"""', "    "))
    return (
        rng.choice(
            [
                "Write the body of this Python function and show all of it.",
                "Implement this function.",
                "Complete the function below, with a short comment on each step.",
            ]
        )
        + "\n\n"
        + _fenced("\n".join(header))
    )


def _edit(rng: random.Random, material: Material) -> str:
    module, node, source = rng.choice(material.functions)
    names = sorted(
        {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    )
    choices = [
        "Add type hints to every parameter and the return value. Give the whole function back.",
        "Write a docstring for this function that describes its arguments and what it returns.",
        "Explain line by line what this function does.",
        "Write three pytest tests for this function.",
        "Review this function: point out bugs, unclear names and edge cases.",
        "Rewrite this function to be easier to read, keeping its behaviour.",
        "Add input validation that raises ValueError with a helpful message. Show the full code.",
    ]
    if names:
        old = rng.choice(names)
        choices.append(
            f"Rename the variable `{old}` to a more descriptive name everywhere. Return the "
            "complete function."
        )
    return rng.choice(choices) + "\n\n" + _fenced(source)


def _write(rng: random.Random, material: Material) -> str:
    module, node, _ = rng.choice(material.functions)
    doc = ast.get_docstring(node)
    what = doc.split("\n")[0].strip() if doc else f"what `{module}.{node.name}` does"
    return rng.choice(
        [
            f"Write a Python function that does the following, with a docstring and a usage "
            f"example: {what}",
            f"Explain what the Python function `{module}.{node.name}` does and show a short "
            "example of using it.",
        ]
    )


def _translate(rng: random.Random, material: Material) -> str:
    paragraph = rng.choice(material.paragraphs)
    sentence = paragraph.split(". ")[0].strip().rstrip(".") + "."
    return f"Translate into {rng.choice(_LANGUAGES)}:\n\n{sentence}"


#: The template families, drawn with equal chance.
FAMILIES: tuple[Callable[[random.Random, Material], str], ...] = (
    _explain,
    _advice,
    _chat,
    _word_problem,
    _summarize,
    _question,
    _complete,
    _edit,
    _write,
    _translate,
)


def conversations(
    count: int, seed: int, material: Material, keep: Callable[[str], bool]
) -> list[Conversation]:
    """`count` distinct one-turn conversations, seeded, each of which `keep` accepts."""
    rng = random.Random(seed)
    found: list[Conversation] = []
    seen: set[str] = set()
    attempts = 0
    while len(found) < count:
        attempts += 1
        if attempts > 20 * count + 100:
            raise SpecDecodeError("the prompt templates gave too few distinct prompts")
        text = rng.choice(FAMILIES)(rng, material)
        if text in seen or not keep(text):
            continue
        seen.add(text)
        found.append([{"role": "user", "content": text}])
    return found


def follow_up(conversation: Conversation, answer: str, rng: random.Random) -> Conversation:
    """A second turn: the model's answer (its first paragraph, as bench conversations hold a short
    assistant turn) and a follow-up question."""
    reply = answer.strip().split("\n\n")[0].strip() or answer.strip()
    return [
        *conversation,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": rng.choice(FOLLOW_UPS)},
    ]
