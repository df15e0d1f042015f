"""A task format of one's own, outside kif_jax: extractive question answering scored by SQuAD's token F1.

    PYTHONPATH=examples python main.py --config.data_dir=<dir> --config.tasks=<tasks> --config.task_format=my_formats:TokenF1

Each `<data_dir>/<split>/<task>.json` is a JSON list of {"id", "context", "question", "answers": [...]}; a task
without `<data_dir>/dev/` files has its dev examples held out of its training file.
"""
import collections
import json
import re
import string

from kif_jax.errors import DataError
from kif_jax.tasks import TaskFormat


def words(text):
    """SQuAD's normal form: lower-cased, punctuation and articles removed, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction, answer):
    common = collections.Counter(words(prediction)) & collections.Counter(words(answer))
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(words(prediction)), same / len(words(answer))
    return 2 * precision * recall / (precision + recall)


class TokenF1(TaskFormat):
    name = "token_f1"  # config.task_format = "token_f1" once registered
    metric = "token F1"  # what the score matrix holds, in tables and results.json
    binary = False  # scores lie between 0 and 1: no `correct` field, no McNemar test
    has_dev_split = False

    def read(self, path, task):
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not rows:
            raise DataError(f"{path}: expected a non-empty JSON list of questions")
        records = []
        for i, row in enumerate(rows):
            if not row.get("answers"):
                raise DataError(f"{path}: question {i} has no answer")
            head = "Answer from the context.\nContext: "
            tail = f"\nQuestion: {row['question']}\nAnswer:"
            records.append({"id": str(row["id"]), "input": head + row["context"] + tail, "output": row["answers"][0],
                            "answers": row["answers"], "task": task,
                            "prompt_parts": (head, row["context"], tail)})  # a long context loses its end
        return records

    def score(self, prediction, record):
        return {"score": max(token_f1(prediction, answer) for answer in record["answers"])}
