"""`init_from` brings its tokenizer: a workdir keeps the tokenizer it trained with, the next
stage takes it when `tokenizer` is empty, a tokenizer whose special ids disagree with the
model is refused before any step, and exports carry tokenizer files and generation config."""

import json
import shutil

import pytest

from experiments import export, lm
from experiments.configs import pretrain, sft
from llama_jax.checkpoint import load_hf_checkpoint, workdirs
from llama_jax.tokenizer import load_tokenizer, tiny_tokenizer
from llama_jax.training.metrics import read_metrics

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


def small(cfg, steps=2):
  cfg.model.update(**SMALL)
  cfg.data.update(seq_len=64, batch_size=8, eval_split="")
  cfg.optimizer.update(warmup_steps=1)
  cfg.train.update(num_steps=steps, log_every=1, checkpoint_every=1000)
  return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pt")
  lm.run(small(pretrain.get_config("tiny")), str(workdir))
  return workdir


def test_next_stage_takes_the_kept_tokenizer_and_refuses_a_mismatch(pretrained, tmp_path):
  assert (pretrained / "tokenizer" / "SPEC").read_text() == "tiny:llama3"
  assert workdirs.tokenizer_source(pretrained) == "tiny:llama3"
  cfg = small(sft.get_config("tiny"))
  cfg.update(init_from=str(pretrained), tokenizer="")
  lm.run(cfg, str(tmp_path / "sft"))
  assert workdirs.tokenizer_source(tmp_path / "sft") == "tiny:llama3"
  assert len([r for r in read_metrics(tmp_path / "sft") if "loss" in r]) == 2

  wrong = small(sft.get_config("tiny"))
  wrong.update(init_from=str(pretrained), tokenizer="tiny:llama2")
  with pytest.raises(ValueError, match=r"tokenizer='tiny:llama2' does not fit the model .*"
                                       r"BOS id 1 != the model's bos_token_id=1024"):
    lm.run(wrong, str(tmp_path / "wrong"))
  assert not (tmp_path / "wrong" / "checkpoints").exists()  # refused before any step
  no_source = small(sft.get_config("tiny"))
  no_source.tokenizer = ""
  with pytest.raises(ValueError, match="tokenizer is empty and there is no init_from"):
    lm.run(no_source, str(tmp_path / "none"))


@pytest.mark.parametrize("through", ["workdir", "hf_export"])
def test_llama3_model_fine_tuned_with_the_llama2_tokenizer_is_refused_before_any_write(
  pretrained, tmp_path, through
):
  """The finding (issue 19): a model pretrained with the Llama 3 tokenizer fine-tuned with
  the Llama 2 one trained on wrong special ids (loss 7.85 instead of 3.6). Through the SFT
  launcher, from the pretraining workdir or its Hugging Face export, the run is refused
  before anything is written to its workdir (`models.check_tokenizer`)."""
  init_from = pretrained
  if through == "hf_export":
    init_from = tmp_path / "hf"
    export.run(str(pretrained), str(init_from))
  cfg = small(sft.get_config("tiny"))
  cfg.update(init_from=str(init_from), tokenizer="tiny:llama2")
  with pytest.raises(ValueError, match=(
      r"tokenizer='tiny:llama2' does not fit the model \(init_from='.*'\): BOS id 1 != the "
      r"model's bos_token_id=1024; EOS/stop ids \[2\] are not among the model's "
      r"eos_token_id=(\(1025, 1032, 1033\)|\[1025, 1032, 1033\]);")):
    lm.run(cfg, str(tmp_path / "sft"))
  # Nothing but the lock the run held while it checked (`workdirs.locked`).
  written = [p.name for p in (tmp_path / "sft").rglob("*")] if (tmp_path / "sft").exists() else []
  assert set(written) <= {workdirs.LOCK_FILE}, written


def test_hf_directory_brings_its_tokenizer_and_exports_carry_one(pretrained, tmp_path):
  # An HF directory with Meta's file beside the weights (as Llama 2/3 repositories ship it).
  export.run(str(pretrained), str(tmp_path / "hf"))
  shipped = {p.name for p in (tmp_path / "hf").iterdir()}
  assert {"config.json", "tokenizer.model", "generation_config.json"} <= shipped
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation == {"bos_token_id": 1024, "eos_token_id": [1025, 1032, 1033]}
  tiny = tiny_tokenizer("llama3")
  assert load_tokenizer(tmp_path / "hf").encode("Hello world") == tiny.encode("Hello world")

  cfg = small(sft.get_config("tiny"))
  cfg.update(init_from=str(tmp_path / "hf"), tokenizer="")
  lm.run(cfg, str(tmp_path / "sft"))
  assert (tmp_path / "sft" / "tokenizer" / "tokenizer.model").is_file()  # copied, not linked
  shutil.rmtree(tmp_path / "hf")  # the workdir is self-contained
  export.run(str(tmp_path / "sft"), str(tmp_path / "hf2"))
  config, _ = load_hf_checkpoint(tmp_path / "hf2")
  assert config.bos_token_id == 1024
  assert load_tokenizer(tmp_path / "hf2").bos_id == 1024
