"""Ghost Attention (GAtt) data: multi-turn dialogues that keep a system instruction
(Llama 2, section 3.3).

Recipe: take multi-turn dialogues [u1, a1, …, un, an] and an instruction `inst` to follow
throughout ("answer in capital letters"). Sample the answers from the latest model with
`inst` appended to *every* user message, so each answer follows it. The training record
then keeps `inst` only at the start (here the system message, which the Llama 2 format puts
inside the first user turn) and the loss only on the last answer: the earlier turns,
answers included, are context (`loss_on="last_assistant"`). The model learns to attend to
an instruction many turns back.

Instructions are checked by a program (`Instruction.check`), so the report measures
instruction following without a reward model. Answers come one of two ways:

- "policy": the sampled answers as they are; a dialogue is kept only if every answer
  passes the check (Llama 2's way, for a model that follows instructions in-turn);
- "rewrite": each sampled answer is rewritten by `Instruction.rewrite` to comply, a
  stand-in for an instruction-following sampler when the model (a tiny one) cannot follow
  an unseen instruction at all.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

Messages = list[dict[str, str]]
MODES = ("policy", "rewrite")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A system instruction, how to check an answer against it, and how to make one comply."""

  text: str
  check: Callable[[str], bool]
  rewrite: Callable[[str], str]


def _no_letters_where(text: str, case: Callable[[str], bool]) -> bool:
  """A non-empty answer with no letter of the given case."""
  return bool(text.strip()) and not any(case(c) for c in text)


def _ends_with(suffix: str) -> Instruction:
  return Instruction(
    f"End every answer with '{suffix}'",
    lambda a: a.rstrip().endswith(suffix),
    lambda a: a if a.rstrip().endswith(suffix) else f"{a.rstrip()} {suffix}",
  )


def _starts_with(prefix: str) -> Instruction:
  return Instruction(
    f"Begin every answer with '{prefix}'",
    lambda a: a.lstrip().startswith(prefix),
    lambda a: a if a.lstrip().startswith(prefix) else f"{prefix} {a.lstrip()}",
  )


INSTRUCTIONS: dict[str, Instruction] = {
  "capitals": Instruction(
    "Always answer in capital letters.",
    lambda a: _no_letters_where(a, str.islower),
    str.upper,
  ),
  "lowercase": Instruction(
    "Always answer in lowercase letters.",
    lambda a: _no_letters_where(a, str.isupper),
    str.lower,
  ),
  "over": _ends_with("Over."),
  "ahoy": _starts_with("Ahoy!"),
}


def get_instructions(names: str | Sequence[str]) -> list[Instruction]:
  """Instructions by name (comma-separated or a list); names are keys of `INSTRUCTIONS`."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in INSTRUCTIONS]
  if unknown or not names:
    raise ValueError(f"gatt instructions {unknown or names!r}; known: {sorted(INSTRUCTIONS)}")
  return [INSTRUCTIONS[n] for n in names]


def exchanges(sft_records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
  """Every (user, assistant) pair of the sft records, system messages left out."""
  pairs = []
  for record in sft_records:
    turns = [m for m in record["messages"] if m["role"] != "system"]
    pairs += [(u["content"], a["content"]) for u, a in zip(turns[::2], turns[1::2], strict=True)]
  return pairs


def make_dialogues(
  pairs: Sequence[tuple[str, str]], num_dialogues: int, num_turns: int, seed: int
) -> list[list[tuple[str, str]]]:
  """`num_dialogues` dialogues of `num_turns` exchanges drawn without replacement."""
  if num_dialogues * num_turns > len(pairs):
    raise ValueError(
      f"{num_dialogues} dialogues × {num_turns} turns need {num_dialogues * num_turns} "
      f"exchanges; the data has {len(pairs)}"
    )
  drawn = random.Random(seed).sample(list(pairs), num_dialogues * num_turns)
  return [drawn[i * num_turns : (i + 1) * num_turns] for i in range(num_dialogues)]


def with_instruction(user: str, instruction: Instruction) -> str:
  return f"{user} {instruction.text}"


def sampling_prompt(instruction: Instruction, users: Sequence[str], answers: Sequence[str]):
  """The chat to sample the next answer from: `instruction` appended to every user turn."""
  messages: Messages = []
  for k, user in enumerate(users):
    messages.append({"role": "user", "content": with_instruction(user, instruction)})
    if k < len(answers):
      messages.append({"role": "assistant", "content": answers[k]})
  return messages


def training_record(
  instruction: Instruction, users: Sequence[str], answers: Sequence[str]
) -> dict[str, Any]:
  """The `sft` record: the instruction once, as the system message, then the dialogue
  without it (train with `loss_on="last_assistant"`)."""
  messages: Messages = [{"role": "system", "content": instruction.text}]
  for user, answer in zip(users, answers, strict=True):
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
  return {"messages": messages}


def sample_records(
  sample: Callable[[list[Messages]], list[str]],
  dialogues: Sequence[Sequence[tuple[str, str]]],
  instructions: Sequence[Instruction],
  mode: str,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """GAtt `sft` records from dialogues, dialogue i following `instructions[i % n]`.

  `sample(chats) -> answers` answers a batch of chats (the model); turn k of every dialogue
  is sampled in one call, conditioned on the dialogue's answers so far. Returns the records
  and statistics: the share of sampled answers that followed the instruction before any
  rewrite, and how many dialogues were kept.
  """
  if mode not in MODES:
    raise ValueError(f"gatt mode={mode!r}; expected one of {MODES}")
  chosen = [instructions[i % len(instructions)] for i in range(len(dialogues))]
  users = [[u for u, _ in d] for d in dialogues]
  answers: list[list[str]] = [[] for _ in dialogues]
  followed = 0
  for k in range(len(users[0])):
    chats = [
      sampling_prompt(inst, u[: k + 1], a)
      for inst, u, a in zip(chosen, users, answers, strict=True)
    ]
    for i, answer in enumerate(sample(chats)):
      followed += chosen[i].check(answer)
      answers[i].append(chosen[i].rewrite(answer) if mode == "rewrite" else answer)
  records = [
    training_record(inst, u, a)
    for inst, u, a in zip(chosen, users, answers, strict=True)
    if all(map(inst.check, a)) and all(x.strip() for x in a)
  ]
  total = sum(len(u) for u in users)
  return records, {"sampled_followed": followed / max(total, 1), "kept": float(len(records))}


def eval_chats(
  dialogues: Sequence[Sequence[tuple[str, str]]], instructions: Sequence[Instruction]
) -> tuple[list[Messages], list[Instruction]]:
  """Held-out chats: the instruction as the system message, the earlier turns with their
  reference answers made compliant, ending with the last user message. The last answer,
  generated by the model, is what `Instruction.check` scores."""
  chats, chosen = [], []
  for i, dialogue in enumerate(dialogues):
    inst = instructions[i % len(instructions)]
    users = [u for u, _ in dialogue]
    earlier = [inst.rewrite(a) for _, a in dialogue[:-1]]
    record = training_record(inst, users[:-1], earlier)
    chats.append(record["messages"] + [{"role": "user", "content": users[-1]}])
    chosen.append(inst)
  return chats, chosen


def follow_rate(answers: Sequence[str], instructions: Sequence[Instruction]) -> float:
  """Share of answers that follow their instruction."""
  return sum(inst.check(a) for a, inst in zip(answers, instructions, strict=True)) / max(
    len(answers), 1
  )
