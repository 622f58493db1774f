"""Train / validation / test splits of tasks, disjoint by entity.

Every choice a recipe makes (layer, coefficient, k, threshold) is made on train / validation rows; the test
rows are read once, by the evaluation. Splits are disjoint by **entity** (the name, profession, subject, ...
a row is about), not only by row: a "held-out" profession that also occurs in the train prompts is not
held out.

Where a row's split comes from:

* Built-in suites: every row carries a `"split"` label, written by `scripts/build_suites.py`, which
  partitions each suite's entity pool (seeded) so that the entity sets of the three splits are pairwise
  disjoint (`ENTITIES` says what the entities of each suite are; `check_disjoint` verifies it).
* Your own files: a row may carry a top-level `"split"` ("train" | "validation" | "test"). A row without
  one is assigned deterministically from its **entity key**: `meta["entity"]` when present (a string;
  other JSON values are keyed by their JSON text), else the prompt. The key's SHA-256 digest, its first
  8 bytes read as a big-endian integer u and divided by 2**64, gives train when u < 0.5, validation when
  u < 0.7, else test (50% / 20% / 30% in expectation). The assignment depends on nothing but the key, so
  it is the same on every run, machine and Python version, and rows that share an entity key share a
  split. (An unlabelled row whose key equals a labelled row's key takes that row's label, so a partly
  labelled file stays entity-disjoint.) Give rows about the same thing the same `meta["entity"]` to keep
  them together.
"""

from __future__ import annotations

import hashlib
import json

from mechanic.tasks.task import Example, Task, TaskError

SPLITS = ("train", "validation", "test")
# Hash assignment of unlabelled rows: cumulative upper bounds of train and validation.
FRACTIONS = {"train": 0.5, "validation": 0.2, "test": 0.3}

# The entities of a built-in suite's example: the meta keys whose values are its entities.
ENTITIES: dict[str, tuple[str, ...]] = {
    "ioi": ("IO", "S", "C"),                              # the three names
    "gender": ("profession", "corrupted_profession"),     # clean and corrupted professions
    "facts": ("subject", "corrupted_subject"),            # clean and corrupted subjects
    "facts_large": ("subject",),                          # the subject (no corrupted prompts)
    "sentiment": ("item",),                               # what is reviewed (movie, hotel, ...)
    "icl_labels": ("query",),                             # the query input phrase
    "greater_than": ("event", "start", "problem", "corrupted_problem"),   # years: event noun, start year;
                                                                          # sums: "a + b", clean and corrupted
    "refusal": (),                                        # the instruction itself (the prompt)
}
_DETECT = {"ioi": "IO", "gender": "profession", "facts": "subject", "sentiment": "item", "icl_labels": "query",
           "greater_than": "kind"}


def entity_key(example: Example) -> str:
    """The key the hash assignment uses: meta["entity"] when present, else the prompt."""
    ent = example.meta.get("entity")
    if ent is None:
        return example.prompt
    return ent if isinstance(ent, str) else json.dumps(ent, sort_keys=True, ensure_ascii=False)


def assign(key: str) -> str:
    """The split of an entity key: "train" / "validation" / "test" by its SHA-256 digest (module docstring)."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    if u < FRACTIONS["train"]:
        return "train"
    return "validation" if u < FRACTIONS["train"] + FRACTIONS["validation"] else "test"


def labels(examples: list[Example]) -> list[str]:
    """Each example's split: its own label, else the label of a labelled row with the same entity key, else
    `assign(entity_key(example))`."""
    known: dict[str, str] = {}
    for e in examples:
        if e.split is not None:
            known.setdefault(entity_key(e), e.split)
    return [e.split or known.get(entity_key(e)) or assign(entity_key(e)) for e in examples]


def entities(example: Example, suite: str | None = None) -> set[str]:
    """The entities of an example. For a built-in suite (`suite`, or, when None, recognised by its meta keys)
    the values of the suite's `ENTITIES` keys present in meta; otherwise (or when none is present) the
    entity key alone (meta["entity"] or the prompt). "refusal" (the safety instruction sets): the instruction."""
    if suite is None:
        suite = next((s for s, k in _DETECT.items() if k in example.meta), None)
    keys = ENTITIES.get(suite or "", ())
    found = {str(example.meta[k]) for k in keys if example.meta.get(k) is not None}
    return found or {entity_key(example)}


def summary(task: Task) -> dict[str, dict[str, int]]:
    """Rows and distinct entities per split: {"train": {"rows": n, "entities": m}, ...}."""
    out = {s: {"rows": 0, "entities": set()} for s in SPLITS}
    for e, s in zip(task.examples, labels(task.examples)):
        out[s]["rows"] += 1
        out[s]["entities"] |= entities(e, task.name)
    return {s: {"rows": v["rows"], "entities": len(v["entities"])} for s, v in out.items()}


def check_disjoint(task: Task) -> dict[str, dict[str, int]]:
    """Raise TaskError when an entity (see `entities`) or a prompt occurs in two splits; else the `summary`."""
    seen: dict[str, tuple[str, int]] = {}
    prompts: dict[str, tuple[str, int]] = {}
    clashes = []
    for i, (e, s) in enumerate(zip(task.examples, labels(task.examples))):
        for what, table, keys in (("entity", seen, entities(e, task.name)), ("prompt", prompts, {e.prompt})):
            for k in sorted(keys):
                first = table.setdefault(k, (s, i))
                if first[0] != s:
                    clashes.append(f"{what} {k!r} is in {first[0]} (row {first[1]}) and {s} (row {i})")
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise TaskError(f"Task {task.name!r}: the splits are not disjoint: {'; '.join(clashes[:3])}{more}. "
                        "Label every row about one entity with the same split (or give them the same "
                        'meta["entity"] and no label).')
    return summary(task)
