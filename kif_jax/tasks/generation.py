"""Generation: Super-NaturalInstructions tasks (SuperNI), free-text answers scored by ROUGE-L.

A split file `<data_dir>/<split>/<task>.json` is one official Super-NaturalInstructions task: a JSON object
with `Definition` (a list whose first string is the instruction, or a string), `Instances` (`{"id", "input",
"output"}`, `output` a list of reference strings or one string) and metadata, which is not read.

The prompt is SAPT's (circle-hit/SAPT, src/cl_dataset.py `load_SuperNI_dataset`, zero-shot mode; docs/tasks.md
cites the lines):

    Definition: <Definition[0], stripped>

    Now complete the following example -
    Input: <instance input>
    Output:<space>

An over-long prompt loses the end of the instance input; the definition and the closing "Output: " stay
(decoder-only models; T5 inputs lose their end, as SAPT's T5 collator cuts them). The model is trained on one
reference per instance (SAPT draws one at random; here the draw is fixed by the instance id, so every run trains
on the same one) and scored against all of them.

Score: ROUGE-L F-measure of the prediction against each reference, the best of them (rouge-score's
`RougeScorer(["rougeL"], use_stemmer=True)`, as Super-NaturalInstructions' and SAPT's compute_metrics.py);
exact match after lower-casing, removing punctuation and collapsing whitespace (articles kept) is recorded
beside it (`exact_match`, results.json "also"). A task's entry is the mean ROUGE-L.
"""
from __future__ import annotations

import json
import pathlib
import string
import zlib
from typing import Any, Sequence

from kif_jax.errors import DataError
from kif_jax.tasks.base import TaskFormat

DEFINITION_PREFIX = "Definition: "
EXAMPLE_HEADER = "Now complete the following example -\n"
INPUT_PREFIX = "Input: "
OUTPUT_PREFIX = "Output: "

_PUNCTUATION = frozenset(string.punctuation)
_SCORER: Any = None


def sapt_prompt(definition: str, text: str) -> tuple[str, str, str]:
    """SAPT's SuperNI prompt as (head, body, tail): the definition and the example header, the instance input
    (what truncation may shorten), and the answer prefix."""
    head = DEFINITION_PREFIX + definition.strip() + "\n\n" + EXAMPLE_HEADER + INPUT_PREFIX
    return head, text, "\n" + OUTPUT_PREFIX


def normalize_text(text: str) -> str:
    """Super-NaturalInstructions' exact-match form: lower-cased, punctuation removed, whitespace collapsed
    (SQuAD's normalisation without removing articles)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Whether the prediction equals some reference after `normalize_text`."""
    return any(normalize_text(prediction) == normalize_text(ref) for ref in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """The best ROUGE-L F-measure of the prediction against each reference (rouge-score, Porter stemmer)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(float(_SCORER.score(target=ref, prediction=prediction)["rougeL"].fmeasure) for ref in references)


def training_reference(instance_id: str, references: Sequence[str]) -> str:
    """The one reference an instance is trained on: fixed by its id (crc32), so every run and order agree."""
    return references[zlib.crc32(instance_id.encode("utf-8")) % len(references)]


class Generation(TaskFormat):
    name = "generation"
    metric = "ROUGE-L"
    binary = False
    also = ("exact_match",)
    has_dev_split = False  # upstream dev.json is test.json: dev examples are held out of the training file
    has_options = False

    def read(self, path: pathlib.Path, task: str) -> list[dict]:
        data = _read_object(path)
        definition = data["Definition"]
        if isinstance(definition, list):
            if not definition or not isinstance(definition[0], str):
                raise DataError(f"{path}: 'Definition' must be a string or a list whose first item is the "
                                f"instruction string")
            definition = definition[0]
        elif not isinstance(definition, str):
            raise DataError(f"{path}: 'Definition' must be a string or a list of strings, got "
                            f"{type(definition).__name__}")
        instances = data["Instances"]
        if not isinstance(instances, list):
            raise DataError(f"{path}: 'Instances' must be a list of {{id, input, output}} objects, got "
                            f"{type(instances).__name__}")
        if not instances:
            raise DataError(f"{path}: 'Instances' is empty")
        records, seen = [], set()
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise DataError(f"{path}: instance {i} is a JSON {type(instance).__name__}, not an object")
            rid = instance.get("id", str(i))
            where = f"{path}: instance {i} (id {rid!r})"
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise DataError(f"{where}: field 'id' must be a string, got {type(rid).__name__}")
            rid = str(rid)
            if rid in seen:
                raise DataError(f"{where}: duplicate id")
            seen.add(rid)
            text = instance.get("input")
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'input' must be a string, got "
                                f"{'nothing' if text is None else type(text).__name__}")
            output = instance.get("output")
            references = [output] if isinstance(output, str) else output
            if not references:
                raise DataError(f"{where} has no reference (its 'output' is missing or empty)")
            if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
                raise DataError(f"{where}: field 'output' must be a string or a list of strings")
            parts = sapt_prompt(definition, text)
            records.append({"id": rid, "input": "".join(parts), "output": training_reference(rid, references),
                            "references": list(references), "task": task, "prompt_parts": parts})
        return records

    def score(self, prediction: str, record: dict) -> dict[str, Any]:
        references = record["references"]
        return {"score": rouge_l(prediction, references), "exact_match": exact_match(prediction, references)}

    def generation_length(self, records: Sequence[dict], tokenizer: Any, max_target_length: int) -> int | None:
        """The longest reference of the training records in tokens, at most train.max_target_length."""
        references = [ref for r in records for ref in r["references"]]
        lengths = [len(ids) for ids in tokenizer.encode_batch(references, add_special_tokens=False)]
        return max(1, min(max_target_length, max(lengths, default=1)))


def _read_object(path: pathlib.Path) -> dict:
    """The task object of one file; every problem a one-line DataError."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty (expected a Super-NaturalInstructions task object)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        hint = (" (a list of records is the classification benchmark's format: is data_dir the SuperNI "
                "benchmark, or task_format right?)") if isinstance(data, list) else ""
        raise DataError(f"{path}: not a Super-NaturalInstructions task: expected a JSON object with 'Definition' "
                        f"and 'Instances', found a JSON {type(data).__name__}{hint}")
    for field in ("Definition", "Instances"):
        if field not in data:
            raise DataError(f"{path}: the task object has no {field!r} (a Super-NaturalInstructions task needs "
                            f"'Definition' and 'Instances')")
    return data


FORMATS = (Generation,)
