"""Ghost Attention data (layout, loss mask, both answer modes) and the report's policy
evaluation (task metrics by hand, KL to a reference against a full-logits computation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import TINY_MODEL
from llama_jax import Llama, LlamaConfig
from llama_jax.data import bundled, gatt
from llama_jax.evaluation import policy as evaluation
from llama_jax.parallel import sharding
from llama_jax.tokenizer import render_chat, tiny_tokenizer

SMALL = {k: v for k, v in TINY_MODEL.items() if k != "preset"} | dict(
  num_layers=2, d_model=64, head_dim=16, mlp_dim=128
)


def test_instructions_check_what_rewrite_makes():
  answers = ["2 + 3 = 5.", "The capital of Peru is Lima.", "I'm sorry, but I can't help with that."]
  for name, inst in gatt.INSTRUCTIONS.items():
    for a in answers:
      assert inst.check(inst.rewrite(a)), (name, a)
      assert inst.rewrite(inst.rewrite(a)) == inst.rewrite(a), name  # idempotent
    assert not all(inst.check(a) for a in answers), name  # the raw answers do not all pass
  with pytest.raises(ValueError, match="known"):
    gatt.get_instructions("capitals,shout")


def test_sampling_prompts_training_records_and_loss_mask():
  inst = gatt.INSTRUCTIONS["over"]
  dialogue = [("What is 2 + 3?", "5."), ("And 4 + 4?", "8."), ("Capital of Peru?", "Lima.")]
  seen = []

  def sample(chats):  # answers the last user message; records what the model was shown
    seen.append(chats)
    return ["Answer." for _ in chats]

  records, stats = gatt.sample_records(sample, [dialogue], [inst], "rewrite")
  # Turn k is sampled with the instruction appended to every user message so far.
  assert [len(c[0]) for c in seen] == [1, 3, 5]
  assert all(m["content"].endswith(inst.text) for c in seen for m in c[0] if m["role"] == "user")
  assert stats == {"sampled_followed": 0.0, "kept": 1.0}
  (record,) = records
  roles = [m["role"] for m in record["messages"]]
  assert roles == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
  assert record["messages"][0]["content"] == inst.text
  assert [m["content"] for m in record["messages"][1::2]] == [u for u, _ in dialogue]
  assert all(m["content"] == "Answer. Over." for m in record["messages"][2::2])

  # Trained with loss on the last turn only: the loss covers exactly the last answer.
  tok = tiny_tokenizer("llama3")
  chat = render_chat(tok, record["messages"], loss_on="last_assistant")
  answer = render_chat(tok, record["messages"], loss_on="all_assistant")
  assert 0 < chat.loss_mask.sum() < answer.loss_mask.sum()
  last = np.flatnonzero(chat.loss_mask)
  assert tok.decode(chat.tokens[last].tolist()).startswith("Answer. Over.")

  # "policy" mode keeps only dialogues whose every sampled answer complies.
  kept, _ = gatt.sample_records(lambda c: ["x Over."] * len(c), [dialogue], [inst], "policy")
  dropped, _ = gatt.sample_records(sample, [dialogue], [inst], "policy")
  assert len(kept) == 1 and dropped == []


def test_eval_chats_and_dialogues_from_bundled_data():
  pairs = gatt.exchanges(bundled.load("sft", "test"))
  assert len(pairs) > 300  # multi-turn chats contribute every exchange
  dialogues = gatt.make_dialogues(pairs, 6, 3, seed=0)
  assert len({u for d in dialogues for u, _ in d}) >= 17  # drawn without replacement
  instructions = gatt.get_instructions("capitals,ahoy")
  chats, chosen = gatt.eval_chats(dialogues, instructions)
  assert [i.text for i in chosen] == [instructions[i % 2].text for i in range(6)]
  for chat, inst, d in zip(chats, chosen, dialogues, strict=True):
    assert chat[0] == {"role": "system", "content": inst.text}
    assert chat[-1] == {"role": "user", "content": d[-1][0]}
    assert all(inst.check(m["content"]) for m in chat if m["role"] == "assistant")
  assert gatt.follow_rate(["AHOY", "Ahoy! x"], [instructions[0], instructions[1]]) == 1.0
  with pytest.raises(ValueError, match="exchanges"):
    gatt.make_dialogues(pairs[:5], 2, 3, seed=0)


def test_check_metrics_by_hand():
  records = [
    {"prompt": "1+1?", "reference": "2", "task": "arithmetic", "is_unsafe": False},
    {"prompt": "2+2?", "reference": "4", "task": "arithmetic", "is_unsafe": False},
    {"prompt": "Peru?", "reference": "Lima", "task": "fact", "is_unsafe": False},
    {"prompt": "bad", "is_unsafe": True, "concern": "safety", "task": "refusal"},
    {"prompt": "kill a process?", "is_unsafe": False, "concern": "safety", "task": "comply"},
  ]
  sorry = "I'm sorry, but I can't help with that."
  answers = ["1 + 1 = 2.", "2 + 2 = 5.", "It is Lima.", sorry, sorry]
  m = evaluation.check_metrics(records, answers)
  assert m["accuracy/arithmetic"] == 0.5 and m["accuracy/fact"] == 1.0
  assert m["task_accuracy"] == pytest.approx(2 / 3)
  assert m["refusal_rate"] == 1.0
  assert m["false_refusal_rate"] == 0.25  # 1 of the 4 safe prompts refused
  assert m["accuracy/comply"] == 0.0 and m["accuracy/refusal"] == 1.0


def _full_logits_kl(config, params, ref_params, rows):
  """Σ over response tokens of log π − log π_ref, from full-vocabulary log-softmax."""

  def logp(p):
    logits = Llama(config).apply({"params": p}, rows["tokens"], rows["positions"],
                                 rows["segment_ids"])  # fmt: skip
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(lp, rows["targets"][..., None], -1)[..., 0]

  diff = (logp(params) - logp(ref_params)) * rows["response_mask"]
  return np.asarray(diff.sum(-1))


def test_sampled_kl_is_zero_for_the_reference_and_matches_full_logits(monkeypatch):
  tok = tiny_tokenizer("llama3")
  config = LlamaConfig.preset("tiny", **SMALL)
  mesh = sharding.make_mesh(data=-1, fsdp=1)
  params = sharding.init_params(config, jax.random.key(0), mesh)
  other = sharding.init_params(config, jax.random.key(1), mesh)
  prompts = ["What is 2 + 3?", "Name a color.", "Capital of Peru?"]
  kw = dict(max_new_tokens=12, batch_size=2, mesh=mesh, seed=3)

  same = evaluation.sampled_kl(config, params, params, tok, prompts, **kw)
  assert same["kl"] == 0.0 and same["sampled_length"] > 0

  # Record the rows the estimator scores, then recompute their KL independently.
  captured = []
  real = evaluation.sample_rollout  # the rollout path online RL uses
  monkeypatch.setattr(evaluation, "sample_rollout", lambda *a, **k: captured.append(real(*a, **k))
                      or captured[-1])  # fmt: skip
  est = evaluation.sampled_kl(config, params, other, tok, prompts, **kw)
  expected = np.concatenate([_full_logits_kl(config, params, other, r.rows) for r in captured])
  assert est["kl"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-4)
  assert est["kl_stderr"] == pytest.approx(expected.std(ddof=1) / np.sqrt(3), rel=1e-3)
