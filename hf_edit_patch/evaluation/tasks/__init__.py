"""The eight general-ability tasks of Gu et al. (2024), "Model Editing Harms General Abilities of Large Language
Models: Regularization to the Rescue" (Table 2), run zero-shot with the paper's prompts.

`run_general_tasks(model, tokenizer)` scores a causal LM (or a `PatchedModel`) on each task and returns
`{task: score in [0, 1]}`; comparing the scores of a base model and of the same model with an edit patch attached
measures what the edit cost in general abilities.

Tasks, data (the file expected in `data_dir`), prompt (`PROMPTS`) and score:

- reasoning: GSM8K test (`gsm8k_test.jsonl`); `Q: {question} A: Let's think step by step.`, then
  `... {rationale} Therefore, the answer (arabic numerals) is:`; solve rate.
- nli: RTE (`rte.tsv`); `{sentence1} entails the {sentence2}. True or False? answer:`; accuracy.
- open_qa: NQ-open with a passage (`nq_open.jsonl`); `Refer to the passage below and answer the following
  question. Passage: {passage} Question: {question}`; exact match.
- closed_qa: BoolQ dev (`boolq_dev.jsonl`); `Please answer the given question based on the passage. The answer
  should be exact 'yes' or 'no'. passage: {passage} question: {question}. answer:`; exact match.
- dialogue: MuTual dev (`mutual_dev.jsonl`); `Q: {article} Which choice is correct? Answer Choices: (A) {A}
  (B) {B} (C) {C} (D) {D} A: Among A through D, the answer is`; Recall4@1.
- summarization: SAMSum test (`samsum_test.json`); `{dialogue}\nTL;DR:`; mean of ROUGE-1/2/L F-measures.
- ner: CoNLL-2003 dev (`conll03_dev.txt`); `Please identify {type} Entity from the given text. Text: {sentence}
  Entity:` for each type of Person, Location, Organization, Miscellaneous; entity-level F1.
- sentiment: SST-2 dev (`sst2_dev.tsv`); `For each snippet of text, label the sentiment of the text as positive
  or negative. The answer should be exact 'positive' or 'negative'. text: {sentence} answer:`; accuracy.

The prompts are those of the paper's code release (JasonForJoy/Model-Editing-Hurt, `test-task-code/`), with
missing spaces after punctuation restored ("A:Let's", "text,label", "(A)option"), the typo "Chioces" fixed, and
the final period of RTE's `sentence2` dropped (the template adds one). Where this package departs from that code:

- reasoning: the release fills `{hint}` with GSM8K's gold rationale and reads 5 tokens; here, as in the
  zero-shot chain of thought the prompt comes from (Kojima et al., 2022), the model writes the rationale itself
  (up to 256 tokens, cut where it starts a new "Q:"), then answers after the answer cue (16 tokens). The first
  number of the answer's first line is checked against the gold with `metrics.gsm8k_solved`.
- nli, closed_qa, sentiment: a few tokens are generated greedily and the first label word found (true/false,
  yes/no, positive/negative, whole words, any case) is the prediction; no label word counts as wrong.
- open_qa: the continuation (after its last "Answer:", if the model writes one) is SQuAD-normalized and scores
  1 if some run of its words equals a normalized gold answer, as the release scores it (the prompt has no answer
  cue, so a whole-continuation match would almost never happen).
- dialogue: nothing is generated. Each option is scored by the mean log-probability of its tokens (a leading
  space added) after the prompt; the mean, not the sum, so that longer options are not penalized for their
  length. A hit is when the gold option scores highest (ties go to the earlier option).
- summarization: the first non-empty line of the continuation is the summary (64 tokens at most).
- ner: one prompt per sentence and entity type. The answer's first line (cut before any echoed "Text:" or
  "Entity:") is split on commas and semicolons; "none"-like items are dropped. Gold entities come from the IOB
  tags (IOB1 or IOB2: `B-X` always opens an entity, `I-X` continues one of type X and otherwise opens one).
  Entity texts on both sides lose surrounding quotes/brackets and trailing periods, and are compared
  case-insensitively by `metrics.entity_f1`. The score is corpus-level F1, 2·TP / (#predicted + #gold) over all
  sentences: each pair is qualified by its sentence's index before one `entity_f1` call, so an entity counts
  only in its own sentence.

Prompts longer than the token budget (`max_length`) lose their middle (usually part of a passage or dialogue):
the first quarter and the last three quarters of the budget are kept, so the instruction and the answer cue
survive. Generation is greedy, batched with left padding built here (the tokenizer is not modified), with the
prompts sorted by length; results do not depend on `batch_size` beyond floating-point noise.

Example:
    ```python
    from hf_edit_patch.evaluation import run_general_tasks

    base = run_general_tasks(model, tokenizer, data_dir="data/tasks", limit=200)
    pm = PatchedModel.from_pretrained(model, "out/eiffel")
    edited = run_general_tasks(pm, tokenizer, data_dir="data/tasks", limit=200)
    {task: edited[task] - base[task] for task in base}
    ```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

__all__ = [
    "DATA_FILES",
    "DATA_FORMATS",
    "ENTITY_TYPES",
    "MAX_NEW_TOKENS",
    "PROMPTS",
    "TASKS",
    "run_general_tasks",
]

# the task definitions are plain Python; the runner needs torch and is imported on first use
_LAZY = {
    "DATA_FILES": "data",
    "DATA_FORMATS": "data",
    "ENTITY_TYPES": "prompts",
    "MAX_NEW_TOKENS": "prompts",
    "PROMPTS": "prompts",
    "TASKS": "prompts",
    "run_general_tasks": "run",
}

if TYPE_CHECKING:
    from .data import DATA_FILES, DATA_FORMATS
    from .prompts import ENTITY_TYPES, MAX_NEW_TOKENS, PROMPTS, TASKS
    from .run import run_general_tasks


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
