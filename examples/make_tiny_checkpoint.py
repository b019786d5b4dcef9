"""Write a small random Llama checkpoint (safetensors, Hugging Face layout) to try the executor.

    python examples/make_tiny_checkpoint.py /tmp/tiny-llama [--layers 8 --hidden 256]

Nothing is downloaded: the weights are random, so the text is gibberish, but every code path
(sharding, TP, PP, batching, streaming) is the real one. A tiny byte-level BPE tokenizer with a
chat template is saved beside the weights, so text prompts and chat (`hexplan launch --http`)
work too.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--hidden", type=int, default=256)
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--kv-heads", type=int, default=4)
ap.add_argument("--vocab", type=int, default=1024)
args = ap.parse_args()

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                  max_position_embeddings=1024)
LlamaForCausalLM(cfg).save_pretrained(args.out, safe_serialization=True)

# The tokenizer: byte-level BPE (every byte is in its alphabet, so any text encodes), trained on
# this file's own docstring, at most the model's vocabulary.
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([__doc__] * 4, trainers.BpeTrainer(vocab_size=args.vocab, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok)
fast.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
fast.save_pretrained(args.out)
print(f"wrote {args.out}: {sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) / 1e6:.1f}M parameters")
