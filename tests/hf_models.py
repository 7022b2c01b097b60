"""Tiny randomly initialised Hugging Face causal LMs of every supported family, saved with a
small byte-level BPE tokenizer trained here on `tales` text (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama", "gpt_neox")


def tales_lines(n: int, seed: int = 3) -> list[str]:
    from spd_mcp.model.zoo.tales.corpus import TalesCorpus

    corpus = TalesCorpus(seed)
    return [corpus.story(i).text for i in range(n)]


def make_tokenizer(lines: list[str], *, bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>" if bos else None)


def make_model(family: str, vocab: int, *, seed: int = 0):
    import transformers as tr

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = tr.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0)
    elif family == "llama":
        cfg = tr.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, bos_token_id=1, eos_token_id=0)
    elif family == "gpt_neox":
        cfg = tr.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    model = tr.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():  # make the random model less flat than its default init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def save_tiny(family: str, root: Path, *, n_docs: int = 60) -> tuple[Path, Path]:
    """(model directory, text file) for ``family``; the text is `tales` stories, one per line."""
    lines = tales_lines(n_docs)
    tok = make_tokenizer(lines, bos=family == "llama")
    model = make_model(family, len(tok))
    d = root / f"tiny-{family}"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    text = root / "tales.txt"
    text.write_text("\n".join(lines) + "\n")
    return d, text


def hf_config(family: str, model_dir: Path, text: Path, *, steps: int = 20) -> dict:
    """A small decomposition config for a tiny model (every block matrix, C = 8)."""
    return {
        "name": f"tiny-{family}",
        "target": {"huggingface": str(model_dir)},
        "data": {"text": str(text), "context": 24},
        "modules": [{"pattern": "*.attn.*", "C": 8},
                    {"pattern": "*.glu.*" if family == "llama" else "*.mlp.*", "C": 8}],
        "ci_fn": {"type": "shared_mlp", "hidden": [8]},
        "losses": [
            {"type": "faithfulness", "coeff": 100.0},
            {"type": "importance_minimality", "coeff": 1e-3},
            {"type": "stochastic_recon", "coeff": 1.0},
        ],
        "steps": steps, "batch_size": 4, "lr": 1e-3, "eval_every": steps, "eval_batch_size": 4,
    }
