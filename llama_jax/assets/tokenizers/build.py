"""Build the two tiny tokenizers that the bundled tiny experiments use.

Run from the repository root:

    python -m llama_jax.assets.tokenizers.build          # (re)write both files
    python -m llama_jax.assets.tokenizers.build --check  # verify the shipped files

Writes, next to this file:

- `tiny_llama2.model`: SentencePiece BPE, 512 pieces, trained with Meta's Llama 2 options
  (byte fallback, split digits, BOS 1, EOS 2, UNK 0; see `LLAMA2_TRAINER_OPTIONS`).
- `tiny_llama3.model`: tiktoken rank file, 1024 base tokens (256 bytes + 768 merges learned on
  chunks cut by the Llama 3 regex); the 256 Llama 3 special tokens follow at ids 1024..1279.

The training text is `CORPUS` below: a few KB of plain English about arithmetic, simple facts,
polite refusals and small conversations, the topics of the bundled data, plus a few Llama 2
chat markers so that "[INST]" and "<<SYS>>" do not cost a token per byte. Both trainers are
deterministic (SentencePiece runs on one thread without shuffling or sampling; the tiktoken
trainer breaks ties by rank), so a rebuild reproduces the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_jax.tokenizer import train_sentencepiece_bpe, train_tiktoken_ranks, write_tiktoken_model

HERE = Path(__file__).resolve().parent
LLAMA2_FILE = HERE / "tiny_llama2.model"
LLAMA3_FILE = HERE / "tiny_llama3.model"
LLAMA2_VOCAB = 512
LLAMA3_BASE_VOCAB = 1024

CORPUS = """\
What is 7 plus 5? 7 plus 5 is 12.
What is 12 minus 4? 12 minus 4 is 8.
What is 6 times 9? 6 times 9 is 54.
What is 81 divided by 9? 81 divided by 9 is 9.
Add 23 and 19. The sum of 23 and 19 is 42.
Subtract 15 from 100. The difference is 85.
Multiply 12 by 12. The product is 144.
Divide 250 by 5. The quotient is 50.
How much is 1000 plus 2024? It is 3024.
Compute 3 + 4 * 2. Multiplication comes first, so the answer is 11.
Compute (3 + 4) * 2. The brackets come first, so the answer is 14.
What is 17 + 26? Let me add the tens and the ones: 10 + 20 = 30, 7 + 6 = 13, so 43.
What is 305 - 128? 305 - 128 = 177.
What is 15 * 15? 15 * 15 = 225.
What is 144 / 12? 144 / 12 = 12.
Is 91 a prime number? No, 91 is 7 times 13.
Is 97 a prime number? Yes, 97 is prime.
What is half of 64? Half of 64 is 32.
What is a quarter of 200? A quarter of 200 is 50.
What is 10 percent of 450? Ten percent of 450 is 45.
Round 3.14159 to two decimal places. It is 3.14.
What is the square root of 81? The square root of 81 is 9.
What is 2 to the power of 10? 2 to the power of 10 is 1024.
Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.
If you have 3 apples and buy 4 more, you have 7 apples.
A train travels 60 kilometres in one hour. In 3 hours it travels 180 kilometres.
Sara has 24 sweets and shares them equally with 3 friends, so each of the 4 children gets 6.
The number 1,234,567 has seven digits.
Even numbers end in 0, 2, 4, 6 or 8. Odd numbers end in 1, 3, 5, 7 or 9.
The capital of France is Paris.
The capital of Germany is Berlin.
The capital of Japan is Tokyo.
The capital of Italy is Rome, and the capital of Spain is Madrid.
The capital of Canada is Ottawa, not Toronto.
Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.
The Earth goes around the Sun once a year, about every 365 days.
The Moon goes around the Earth in about 27 days.
There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
There are twelve months in a year, from January to December.
A day has 24 hours, an hour has 60 minutes and a minute has 60 seconds.
Mount Everest is the highest mountain on Earth.
The Pacific is the largest ocean.
Light travels faster than sound, which is why we see lightning before we hear thunder.
Plants make their food from sunlight, water and carbon dioxide.
A spider has eight legs and an insect has six.
Whales are mammals, not fish; they breathe air.
The heart pumps blood through the body.
Iron is a metal, and oxygen is a gas.
The chemical symbol for gold is Au, and for water the formula is H2O.
Shakespeare wrote Hamlet and Romeo and Juliet.
The first person to walk on the Moon was Neil Armstrong, in 1969.
Red, yellow and blue are primary colours.
A triangle has three sides, a square has four, and a hexagon has six.
I'm sorry, but I can't help with that.
I'm sorry, I cannot help with making weapons or anything that could hurt people.
I can't assist with that request, but I'd be happy to help with something else.
I won't provide instructions for breaking into someone's house.
That could be dangerous, so I will not explain how to do it.
I cannot share someone's private information, such as their address or phone number.
Sorry, I can't write that. It would be unkind and could hurt someone.
I'm not able to help you cheat, but I can help you study for the test.
It isn't safe to mix bleach and ammonia; please don't try it.
If you are in danger, please contact your local emergency services.
I'd rather not guess; I don't know the answer to that question.
I don't have enough information to answer that, could you tell me more?
Hello! How can I help you today?
Hi there. Could you help me with my homework?
Of course! What is the question?
Thank you very much for your help.
You're welcome. Have a nice day!
Good morning. What's the weather like today?
I don't have live weather data, but I can explain how forecasts work.
Can you tell me a fun fact? Sure: octopuses have three hearts.
Please answer briefly. Okay, I will keep my answers short.
Could you explain that again, step by step?
Yes. First, read the question. Second, find the numbers. Third, do the sum.
Let's think step by step.
The answer is 42.
The final answer is 7.
That's correct, well done!
That's not quite right; try again.
User: What is 9 plus 10? Assistant: 9 plus 10 is 19.
User: Tell me how to pick a lock. Assistant: Sorry, I can't help with that.
User: What is the capital of Egypt? Assistant: The capital of Egypt is Cairo.
[INST] What is 8 times 7? [/INST] 8 times 7 is 56.
[INST] <<SYS>>
You are a helpful, honest and harmless assistant.
<</SYS>>
[INST] How do I make a bomb? [/INST] I'm sorry, but I can't help with that.
[INST] Name a colour. [/INST] Blue.
The quick brown fox jumps over the lazy dog.
She sells sea shells by the sea shore.
"Why?" he asked. "Because," she said, "it's Tuesday."
Email me at someone@example.com or visit https://example.com/page?id=10.
Prices: $5.99, EUR 12.50 and 3 for 10 pounds; 50% off!
Café, naïve and résumé are words with accents; 東京 is Tokyo in Japanese.
Lists use dashes - like this - or bullets; code uses x = y + 1; and f(x).
    Indented lines keep their spaces, and tabs\tstay tabs.
"""


def corpus() -> list[str]:
  """The training sentences: `CORPUS`, one per line (SentencePiece wants newline-free lines)."""
  return [line for line in CORPUS.splitlines() if line.strip()]


def build_llama2() -> bytes:
  """Serialised SentencePiece model of `tiny_llama2.model`."""
  return train_sentencepiece_bpe(corpus(), LLAMA2_VOCAB)


def build_llama3_ranks() -> dict[bytes, int]:
  """Ranks of `tiny_llama3.model`, trained on the whole corpus (newlines included)."""
  ranks = train_tiktoken_ranks([CORPUS], LLAMA3_BASE_VOCAB)
  if len(ranks) != LLAMA3_BASE_VOCAB:
    raise RuntimeError(f"corpus too small: {len(ranks)} ranks, wanted {LLAMA3_BASE_VOCAB}")
  return ranks


def main(argv: list[str] | None = None) -> int:
  """Write both files, or with --check compare them to a fresh build; returns an exit code."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="verify instead of writing")
  args = parser.parse_args(argv)
  llama2 = build_llama2()
  tmp = HERE / ".tiny_llama3.model.tmp"
  write_tiktoken_model(build_llama3_ranks(), tmp)
  llama3 = tmp.read_bytes()
  tmp.unlink()
  if args.check:
    stale = [
      p.name
      for p, data in ((LLAMA2_FILE, llama2), (LLAMA3_FILE, llama3))
      if not p.is_file() or p.read_bytes() != data
    ]
    print("stale: " + ", ".join(stale) if stale else "both tokenizer files are up to date")
    return 1 if stale else 0
  LLAMA2_FILE.write_bytes(llama2)
  LLAMA3_FILE.write_bytes(llama3)
  for p in (LLAMA2_FILE, LLAMA3_FILE):
    print(f"wrote {p} ({p.stat().st_size} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
