"""Llama 2 / Llama 3 tokenizers behind one interface, chat formats and their loss masks.

    tok = load_tokenizer("Meta-Llama-3.1-8B-Instruct/original/tokenizer.model")
    chat = render_chat(tok, [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}])
    chat.tokens, chat.loss_mask, chat.format_mask    # int32 [T] each

Nothing here imports transformers or torch; they are test oracles only.
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
  get_chat_format,
  render_chat,
  render_prompt_response,
)
from llama_jax.tokenizer.loading import load_tokenizer, tiny_tokenizer
from llama_jax.tokenizer.spm import (
  LLAMA2_TRAINER_OPTIONS,
  SentencePieceTokenizer,
  train_sentencepiece_bpe,
)
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
  "Llama2ChatFormat",
  "Llama3ChatFormat",
  "PromptResponse",
  "RenderedChat",
  "SentencePieceTokenizer",
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
