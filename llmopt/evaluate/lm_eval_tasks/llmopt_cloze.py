"""Docs of the `llmopt_cloze` task: next-word cloze on the builtin corpus's held-out (test) split.

Each doc is the opening words of a held-out text (context) and the word that follows (target); lm-eval
scores the target's log-likelihood and whether greedy decoding would produce it (acc), as for LAMBADA.
"""

from __future__ import annotations

MAX_DOCS = 500
MIN_WORDS = 12
CONTEXT_WORDS = 48


def make_docs(texts: list[str]) -> list[dict]:
    docs = []
    for text in texts:
        words = text.split()
        if len(words) < MIN_WORDS:
            continue
        k = min(len(words) - 1, CONTEXT_WORDS)
        docs.append({"context": " ".join(words[:k]), "target": words[k]})
        if len(docs) == MAX_DOCS:
            break
    return docs


def load_docs(**kwargs) -> dict:
    import datasets

    from llmopt.calibration.corpus import split_texts

    return {"test": datasets.Dataset.from_list(make_docs(split_texts("test")))}
