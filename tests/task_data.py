"""Fine-tuning data made on the spot, with no download: learnable, but not by a lookup.

- classification: is a paragraph from the Python reference (`pydoc_data.topics`) or from a
  software license (the license files installed with torch, numpy, ... and Python's own)?
- instructions: capitalize three words, or reverse their order, for word triples the model has
  not seen in training.

`python tests/task_data.py DIR` writes them as the README's runs use them:
DIR/paragraphs.csv (text,label), DIR/instructions.json (a JSON list) and DIR/licenses.txt
(the license texts, for the LoRA run).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

LICENSED_DISTRIBUTIONS = ("torch", "numpy", "tqdm", "tiktoken", "safetensors", "crc32c")  # always installed


def paragraphs(text: str, shortest: int = 80, longest: int = 600) -> list[str]:
    """Blank-line separated paragraphs of prose (mostly letters), whitespace collapsed."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if shortest <= len(paragraph) <= longest and sum(c.isalpha() for c in paragraph) > 0.6 * len(paragraph):
            found.append(paragraph)
    return found


def license_texts() -> list[str]:
    """The license files of the installed dependencies and CPython's LICENSE.txt (when present)."""
    texts = []
    for name in LICENSED_DISTRIBUTIONS:
        for file in importlib.metadata.distribution(name).files or []:
            if re.search(r"licen[cs]e|copying", str(file), re.IGNORECASE):
                try:
                    texts.append(file.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_license.is_file():
        texts.append(python_license.read_text(encoding="utf-8"))
    return texts


def classification_records() -> list[dict[str, str]]:
    """{"text", "label"} records, labels "docs" and "license", docs (the larger class) first."""
    from pydoc_data.topics import topics

    docs = dict.fromkeys(p for topic in sorted(topics) for p in paragraphs(topics[topic]))
    licenses = dict.fromkeys(p for text in license_texts() for p in paragraphs(text))
    return ([{"text": p, "label": "docs"} for p in docs if p not in licenses]
            + [{"text": p, "label": "license"} for p in licenses])


# one GPT-2 token each, with and without a leading space and capitalized or not: the answer's
# tokens line up with the input's, a task a small model learns in a minute
WORDS = ("apple river stone cloud green paper light north house water dream music table glass night "
         "metal chair field storm money world power space sound heart").split()
TASKS = {
    "Capitalize these words.": lambda words: " ".join(w.capitalize() for w in words),
    "Reverse the order of these words.": lambda words: " ".join(reversed(words)),
}


def instruction_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct records: an instruction from TASKS, three words as input, the answer."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < count:
        instruction = rng.choice(sorted(TASKS))
        words = rng.sample(WORDS, 3)
        if (instruction, tuple(words)) in seen:
            continue
        seen.add((instruction, tuple(words)))
        records.append({"instruction": instruction, "input": " ".join(words), "output": TASKS[instruction](words)})
    return records


def write_csv(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "paragraphs.csv", classification_records())
    (out / "instructions.json").write_text(json.dumps(instruction_records(1200), indent=1) + "\n")
    (out / "licenses.txt").write_text("\n\n".join(license_texts()), encoding="utf-8")  # the README's LoRA run
    print(f"wrote {out / 'paragraphs.csv'}, {out / 'instructions.json'} and {out / 'licenses.txt'}")
