"""The prompts `bench.ttft` sends: token ids cut from real text, the same for every scenario of a run.

A workload is a warm-up round (reported apart; it puts into the caches what the measured round reuses) and
a measured round, one request at a time:
- `long-doc-qa`: D documents of T tokens; warm-up = each document alone; measured = each document
  followed by one of Q questions, in `repeat_mode` order: `tile` (d0 d1 .. d0 d1 ..), `interleave`
  (d0 d0 .. d1 d1 ..) or `random` (shuffled, seeded).
- `multi-turn`: D conversations whose first user message is T tokens; warm-up = turn 0; turn t (measured,
  round-robin over conversations) = turn t-1's prompt + a fixed assistant reply + a new user message of
  `turn_tokens`, so each turn's prompt starts with the one before (replies are fixed text, not generated,
  so every scenario sends identical prompts).
- `rag`: D passages of T tokens; every prompt starts with the same instruction (`RAG_PREAMBLE`, "" for
  none) and the separator (the tokens of "\n\n", `Workload.separator`); warm-up = the instruction and one
  passage followed by the separator (a passage as an earlier request saw it); measured = D x Q prompts of
  the instruction and `passages_per_prompt` passages, each followed by the separator, in seeded random
  orders and combinations, then a question. A segment ends just after each separator, so every passage
  (with its separator) is one segment in the warm-up and in the measured prompts alike (a passage that
  holds the separator itself splits into the same pieces in both). Prefix reuse can only match the first
  passage (later ones follow other text); segment reuse matches all of them. The instruction is what real
  RAG prompts start with, and it matters to segment reuse's quality: without it each passage's KV is
  computed at the very start of its warm-up prompt, where its first token likely served as the attention
  sink, a role it does not have at a later position (SmolLM2-135M, 6 x 400 tokens: perplexity ratio of
  ours-segment 1.11 with the instruction, 1.25 without).

Text: the license texts in /usr/share/common-licenses (any Debian/Ubuntu machine), else the docstrings of
Python's standard library; tokenized with the model's tokenizer, concatenated, and cut cyclically (start i
of D is spread over the corpus, so documents differ from their first token when D x T exceeds it).
"""

import glob
import os
import random
from dataclasses import dataclass, field

from connectors.segments import separator_ends

LICENSES = "/usr/share/common-licenses"
FALLBACK_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "threading", "typing")
WORKLOADS = ("long-doc-qa", "multi-turn", "rag")
RAG_PREAMBLE = "Answer the question using the passages below."
REPEAT_MODES = ("random", "tile", "interleave")
QUESTIONS = (
    "What is this document about?", "Who is granted rights by this text?", "List three obligations it imposes.",
    "What does it say about warranties?", "Summarize the second paragraph.", "Which terms does it define?",
    "What happens if the conditions are violated?", "Does it allow commercial use?",
    "What must be kept when redistributing?", "Name one limitation of liability it states.",
)


@dataclass(frozen=True)
class Request:
    label: str  # e.g. "doc 1 q 0", for reports and errors
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    warmup: tuple[Request, ...]
    measured: tuple[Request, ...]
    notes: tuple[str, ...] = field(default=())
    separator: tuple[int, ...] = ()  # token ids that end a segment (rag); () where segments are not used

    @property
    def longest(self) -> int:
        return max(len(r.tokens) for r in self.warmup + self.measured)

    @property
    def distinct_tokens(self) -> int:
        """Tokens of every prompt of the run, an upper bound on what a cache stores."""
        return sum(len(r.tokens) for r in self.warmup + self.measured)


def corpus_texts() -> list[str]:
    """Real English text: the distinct license files on this machine, else stdlib docstrings."""
    paths = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(LICENSES, "*"))})
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except (OSError, IsADirectoryError):
            continue
    if sum(len(t) for t in texts) > 10_000:
        return texts
    import importlib
    import pydoc

    return [pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in FALLBACK_MODULES]


class Corpus:
    """The corpus as one token sequence; `take` cuts it cyclically."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sep = self.encode("\n\n")
        ids: list[int] = []
        for text in corpus_texts():
            ids += self.encode(text) + sep
        if not ids:
            raise RuntimeError("the text corpus tokenized to nothing; check the tokenizer")
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def take(self, start: int, n: int) -> list[int]:
        ids, size = self.ids, len(self.ids)
        out: list[int] = []
        start %= size
        while len(out) < n:
            out += ids[start: start + n - len(out)]
            start = 0
        return out

    def starts(self, count: int, n: int) -> list[int]:
        """`count` distinct start offsets for pieces of `n` tokens: disjoint when the corpus is long enough."""
        stride = n if count * n <= len(self.ids) else max(1, len(self.ids) // count)
        return [i * stride for i in range(count)]


def _question(corpus: Corpus, i: int, lead: str = "\n\n") -> list[int]:
    text = QUESTIONS[i % len(QUESTIONS)] + (f" (take {i // len(QUESTIONS) + 1})" if i >= len(QUESTIONS) else "")
    return corpus.encode(f"{lead}Question: {text}\nAnswer:")


def _order(pairs: list[tuple[int, int]], mode: str, seed: int) -> list[tuple[int, int]]:
    if mode == "tile":
        return sorted(pairs, key=lambda p: (p[1], p[0]))
    if mode == "interleave":
        return sorted(pairs)
    if mode == "random":
        random.Random(seed).shuffle(pairs)
        return pairs
    raise ValueError(f"repeat_mode: expected one of {REPEAT_MODES}, got {mode!r}")


def long_doc_qa(corpus: Corpus, num_docs: int, doc_tokens: int, questions: int, repeat_mode: str,
                seed: int) -> Workload:
    docs = [corpus.take(s, doc_tokens) for s in corpus.starts(num_docs, doc_tokens)]
    pairs = _order([(d, q) for d in range(num_docs) for q in range(questions)], repeat_mode, seed)
    measured = [Request(f"doc {d} q {q}", tuple(docs[d] + _question(corpus, d + q))) for d, q in pairs]
    warmup = [Request(f"doc {d}", tuple(doc)) for d, doc in enumerate(docs)]
    return Workload("long-doc-qa", tuple(warmup), tuple(measured))


def multi_turn(corpus: Corpus, conversations: int, first_tokens: int, turns: int, turn_tokens: int) -> Workload:
    starts = corpus.starts(conversations * (2 * turns + 1), max(first_tokens, turn_tokens))
    user, assistant = corpus.encode("\nUser: "), corpus.encode("\nAssistant: ")
    prompts, warmup, measured = [], [], []
    for c in range(conversations):
        base = starts[c * (2 * turns + 1):]
        prompt = corpus.encode("User: ") + corpus.take(base[0], first_tokens) + assistant
        prompts.append([prompt])
        warmup.append(Request(f"conv {c} turn 0", tuple(prompt)))
        for t in range(1, turns + 1):
            reply = corpus.take(base[2 * t - 1], turn_tokens)
            message = corpus.take(base[2 * t], turn_tokens)
            prompt = prompt + reply + user + message + assistant
            prompts[c].append(prompt)
    for t in range(1, turns + 1):
        for c in range(conversations):
            measured.append(Request(f"conv {c} turn {t}", tuple(prompts[c][t])))
    return Workload("multi-turn", tuple(warmup), tuple(measured))


def rag(corpus: Corpus, passages: int, passage_tokens: int, questions: int, per_prompt: int, seed: int,
        preamble: str = RAG_PREAMBLE) -> Workload:
    texts = [corpus.take(s, passage_tokens) for s in corpus.starts(passages, passage_tokens)]
    rng, k = random.Random(seed), min(per_prompt, passages)
    sep = corpus.encode("\n\n")
    head = corpus.encode(preamble) + sep if preamble else []
    measured = []
    for i in range(passages * questions):
        order = rng.sample(range(passages), k)
        # The question starts right after the last separator: no second "\n\n" of its own.
        tokens = head + [t for p in order for t in texts[p] + sep] + _question(corpus, i, lead="")
        measured.append(Request(f"passages {order} q {i}", tuple(tokens)))
    warmup = [Request(f"passage {p}", tuple(head + t + sep)) for p, t in enumerate(texts)]
    inner = sum(len(separator_ends(t, sep)) for t in texts)
    notes = [(f"rag: each prompt holds {k} of {passages} passages of {passage_tokens} tokens, each followed by the "
              f"separator {sep} (\"\\n\\n\"); prefix reuse matches the first one, and more only where an earlier "
              "prompt began with the same passages in the same order"),
             f"rag: instruction before the passages: {preamble!r}" if preamble else "rag: no instruction"]
    if inner:
        notes.append(f"rag: the passages hold the separator {inner} times themselves; those passages are several "
                     "segments, cut at the same places in the warm-up and in the measured prompts")
    return Workload("rag", tuple(warmup), tuple(measured), tuple(notes), separator=tuple(sep))


def build(name: str, tokenizer, *, num_docs: int, doc_tokens: int, questions: int, repeat_mode: str = "random",
          turn_tokens: int = 256, passages_per_prompt: int = 3, seed: int = 0,
          rag_preamble: str = RAG_PREAMBLE) -> Workload:
    """The workload `name` (one of WORKLOADS) with the model's tokenizer."""
    for arg, value in (("num_docs", num_docs), ("doc_tokens", doc_tokens), ("questions", questions)):
        if value < 1:
            raise ValueError(f"{arg}: expected a positive integer, got {value}")
    corpus = Corpus(tokenizer)
    if name == "long-doc-qa":
        return long_doc_qa(corpus, num_docs, doc_tokens, questions, repeat_mode, seed)
    if name == "multi-turn":
        return multi_turn(corpus, num_docs, doc_tokens, questions, turn_tokens)
    if name == "rag":
        return rag(corpus, num_docs, doc_tokens, questions, passages_per_prompt, seed, rag_preamble)
    raise ValueError(f"workload: expected one of {WORKLOADS}, got {name!r}")


def load_tokenizer(path_or_name: str):
    """The Hugging Face tokenizer of a local checkpoint dir or a name the hub cache resolves."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_name)
    except Exception as e:  # any loader failure: say which path and what to pass instead
        raise ValueError(f"tokenizer: cannot load one from {path_or_name!r} ({type(e).__name__}: {e}); pass "
                         "--tokenizer with a local checkpoint dir that has tokenizer files") from e


def to_text(tokenizer, tokens) -> str:
    """Token ids back to text (server mode sends text; the server tokenizes it again)."""
    return tokenizer.decode(list(tokens), skip_special_tokens=False)
