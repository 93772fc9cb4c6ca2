"""Llama 2 / Llama 3 / Hugging Face tokenizers behind one interface, chat formats, loss masks.

    tok = load_tokenizer("Meta-Llama-3.1-8B-Instruct/original/tokenizer.model")
    tok = load_tokenizer("SmolLM2-135M-Instruct")        # tokenizer.json + its chat template
    chat = render_chat(tok, [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}])
    chat.tokens, chat.loss_mask, chat.format_mask    # int32 [T] each

Nothing here imports transformers or torch; they are test oracles only. Hugging Face
tokenizers run on the `tokenizers` library and their chat templates on `jinja2`.
"""

from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.chat import (
  CHAT_FORMATS,
  LLAMA2_CHAT,
  LLAMA3_CHAT,
  ChatFormat,
  Llama2ChatFormat,
  Llama3ChatFormat,
  PromptResponse,
  RenderedChat,
)
from llama_jax.tokenizer.hf import HFTokenizer
from llama_jax.tokenizer.loading import load_tokenizer, tiny_tokenizer
from llama_jax.tokenizer.render import get_chat_format, render_chat, render_prompt_response
from llama_jax.tokenizer.spm import (
  LLAMA2_TRAINER_OPTIONS,
  SentencePieceTokenizer,
  train_sentencepiece_bpe,
)
from llama_jax.tokenizer.template import TemplateChatFormat
from llama_jax.tokenizer.tiktoken_bpe import (
  LLAMA3_PATTERN,
  TiktokenTokenizer,
  llama3_special_tokens,
  read_tiktoken_model,
  train_tiktoken_ranks,
  write_tiktoken_model,
)

__all__ = [
  "CHAT_FORMATS",
  "LLAMA2_CHAT",
  "LLAMA2_TRAINER_OPTIONS",
  "LLAMA3_CHAT",
  "LLAMA3_PATTERN",
  "ChatFormat",
  "HFTokenizer",
  "Llama2ChatFormat",
  "Llama3ChatFormat",
  "PromptResponse",
  "RenderedChat",
  "SentencePieceTokenizer",
  "TemplateChatFormat",
  "TiktokenTokenizer",
  "Tokenizer",
  "get_chat_format",
  "llama3_special_tokens",
  "load_tokenizer",
  "read_tiktoken_model",
  "render_chat",
  "render_prompt_response",
  "tiny_tokenizer",
  "train_sentencepiece_bpe",
  "train_tiktoken_ranks",
  "write_tiktoken_model",
]
