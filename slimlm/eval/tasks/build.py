"""Build the two local lm-eval tasks from the protocol texts, deterministically.

    python -m slimlm.eval.tasks.build            # rewrite the shipped JSONL files
    python -m slimlm.eval.tasks.build --check    # rebuild in memory, compare with the shipped bytes

Both read only the *evaluation* split of a protocol text (``slimlm.data.protocol_texts``:
whole documents, never seen by calibration), and every random choice comes from
``random.Random(SEED)``, so the bytes depend on the texts alone. The shipped files
record the sha256 of the texts they were built from (``build_info.json``); the pydoc
text is Python's own help (``pydoc_data``), so another Python minor version has other
text and cannot rebuild the same bytes (the shipped files still load anywhere).

slimlm_wiki_lastword (LAMBADA-style, Paperno et al. 2016), from wiki-v1's evaluation split:
  1. each article is cut into paragraphs at blank lines; leading lines that do not end in ".", "!"
     or "?" (section headings) are dropped, whitespace runs collapsed to one space;
  2. a paragraph is a passage when it is 200..600 characters long, holds at least two
     sentences (". " followed by a capital) and ends with "." right after a space and a word
     of >= 4 ASCII letters. Unlike LAMBADA there is no human filter keeping only words that
     the context makes guessable, so absolute accuracy is low: the task is for comparing a
     compressed model with its base on the same passages;
  3. the final "." is dropped; ``context`` is everything before the last word's space,
     ``target`` is " " + the word; scored by loglikelihood, ``acc`` = the word is the
     model's greedy continuation;
  4. at most LASTWORD_N passages, a seeded sample kept in text order.

slimlm_pydoc_choice (next sentence among 4), from pydoc-v1's evaluation split:
  1. each topic is cut into paragraphs at blank lines; a prose paragraph has no indented
     line (pydoc indents code and grammar) and no heading underline; its lines are joined
     by spaces (without one after a hyphen ending a line: pydoc wraps there) and split into
     sentences after ".", "!" or "?" followed by space and a capital;
  2. a question is a sentence of 30..200 characters that follows at least one sentence of
     its paragraph: ``context`` = up to 3 sentences before it (>= 40 characters), the answer
     is the sentence itself;
  3. three distractors are drawn from the 30..200-character sentences of the *other* topics
     of the split (never the answer's text); the four are shuffled, ``label`` is the answer's
     index; scored as multiple choice, ``acc`` and ``acc_norm`` (log-likelihood per byte);
  4. at most CHOICE_N questions, a seeded sample kept in text order.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from slimlm.data import protocol_texts, text_sha256
from slimlm.errors import SlimlmError
from slimlm.eval.tasks import TASKS_DIR
from slimlm.fsutil import atomic_write_text

SEED = 0
LASTWORD_N = 300
CHOICE_N = 200
LASTWORD_FILE = "wiki_lastword.jsonl"
CHOICE_FILE = "pydoc_choice.jsonl"
INFO_FILE = "build_info.json"

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_LAST_WORD = re.compile(r" ([A-Za-z]{4,})$")
_UNDERLINE = re.compile(r"^[*=~^-]{3,}$")
_WRAPPED_HYPHEN = re.compile(r"(?<=\w)-\n(?=\w)")


def _sample_in_order(items: list, n: int, rng: random.Random) -> list:
    """At most n of ``items``, chosen by ``rng``, in their original order."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


def lastword_records(docs: list[str], *, n: int = LASTWORD_N, seed: int = SEED) -> list[dict[str, str]]:
    """LAMBADA-style passages of ``docs``: [{"context", "target"}] (see the module docstring)."""
    found = []
    for doc in docs:
        for para in _PARAGRAPH.split(doc):
            lines = para.strip().split("\n")
            while len(lines) > 1 and not lines[0].rstrip().endswith((".", "!", "?")):
                lines = lines[1:]  # a section heading on its own line(s) before the paragraph
            text = " ".join(" ".join(lines).split())
            if not (200 <= len(text) <= 600 and text.endswith(".") and _SENTENCE_END.search(text)):
                continue
            m = _LAST_WORD.search(text[:-1])
            if m:
                found.append({"context": text[: m.start()], "target": " " + m.group(1)})
    return _sample_in_order(found, n, random.Random(seed))


def _prose_sentences(doc: str) -> list[list[str]]:
    """The sentences of each prose paragraph of one pydoc topic."""
    out = []
    for para in _PARAGRAPH.split(doc):
        lines = [line for line in para.strip("\n").split("\n") if line.strip()]
        if not lines or any(line[0].isspace() or _UNDERLINE.match(line.strip()) for line in lines):
            continue
        text = _WRAPPED_HYPHEN.sub("-", "\n".join(lines))  # pydoc wraps lines after hyphens: "left-\nhand"
        out.append(_SENTENCE_END.split(" ".join(text.split())))
    return out


def _fits(sentence: str) -> bool:
    return 30 <= len(sentence) <= 200


def choice_records(docs: list[str], *, n: int = CHOICE_N, seed: int = SEED) -> list[dict]:
    """Next-sentence questions of ``docs``: [{"context", "choices", "label"}] (see the module docstring)."""
    paragraphs = [_prose_sentences(doc) for doc in docs]
    pool = [[s for para in paras for s in para if _fits(s)] for paras in paragraphs]  # per document
    questions = []
    for d, paras in enumerate(paragraphs):
        for sents in paras:
            for i in range(1, len(sents)):
                context = " ".join(sents[max(0, i - 3) : i])
                if _fits(sents[i]) and len(context) >= 40:
                    questions.append((d, context, sents[i]))
    rng = random.Random(seed)
    records = []
    for d, context, answer in _sample_in_order(questions, n, rng):
        others = sorted({s for j, sents in enumerate(pool) if j != d for s in sents} - {answer})
        if len(others) < 3:
            raise SlimlmError("the pydoc evaluation split holds fewer than 3 distractor sentences outside one "
                              "topic; the task cannot be built from this Python's pydoc_data")
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        records.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return records


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build_files() -> dict[str, str]:
    """File name -> text of everything the tasks ship: the two JSONL files and build_info.json."""
    wiki = protocol_texts("wiki-v1").evaluation
    pydoc = protocol_texts("pydoc-v1").evaluation
    info = {"seed": SEED, "python": "{}.{}".format(*sys.version_info[:2]),
            "texts_sha256": {"wiki-v1/evaluation": text_sha256(wiki), "pydoc-v1/evaluation": text_sha256(pydoc)}}
    return {LASTWORD_FILE: _jsonl(lastword_records(wiki)), CHOICE_FILE: _jsonl(choice_records(pydoc)),
            INFO_FILE: json.dumps(info, indent=2, sort_keys=True) + "\n"}  # fmt: skip


def differences(out_dir: str | Path = TASKS_DIR) -> list[str]:
    """The shipped files whose bytes differ from a rebuild here (empty: reproducible)."""
    out_dir = Path(out_dir)
    return [name for name, text in build_files().items()
            if not (out_dir / name).is_file() or (out_dir / name).read_bytes() != text.encode("utf-8")]  # fmt: skip


def write_files(out_dir: str | Path = TASKS_DIR, *, overwrite: bool = False) -> list[Path]:
    """Write the task data into ``out_dir`` (each file atomically); an existing file needs ``overwrite``."""
    files = build_files()
    out_dir = Path(out_dir)
    if not overwrite and (taken := [n for n in files if (out_dir / n).exists()]):
        raise SlimlmError(f"{out_dir} already holds {', '.join(taken)}; pass --overwrite to rebuild them")
    return [atomic_write_text(out_dir / name, text, overwrite=overwrite) for name, text in files.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimlm.eval.tasks.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(TASKS_DIR), help="directory for the JSONL files (default: the package's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--check", action="store_true", help="compare a rebuild with the files in --out; write nothing")
    args = p.parse_args(argv)
    if args.check:
        diff = differences(args.out)
        print(f"differ from a rebuild: {', '.join(diff)}" if diff else "the task files rebuild byte for byte")
        return 1 if diff else 0
    for path in write_files(args.out, overwrite=args.overwrite):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
