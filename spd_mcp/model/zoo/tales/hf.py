"""The `tales` corpus and behaviours on Hugging Face ``transformers`` architectures, with the
`tales` tokenizer wrapped as a ``PreTrainedTokenizerFast``:

- `tales-llama`: ``LlamaForCausalLM`` (RoPE, grouped-query attention, SwiGLU, RMSNorm);
- `tales-gpt2`: ``GPT2LMHeadModel`` (fused ``c_attn``, ``Conv1D`` weights, LayerNorm, learned
  positions).

They run every Hugging Face code path on models whose mechanisms are known, and export as
``save_pretrained`` directories."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spd_mcp.model.components import is_conv1d
from spd_mcp.model.hf.adapter import RUN_SUBDIR, as_logits_model, save_pretrained_dir
from spd_mcp.model.hf.tokenizer import HFTokenizer
from spd_mcp.model.zoo.base import Progress
from spd_mcp.model.zoo.tales.entry import TalesEntry
from spd_mcp.model.zoo.tales.train import evaluate_behaviours, train_tales_model

CONFIG_FILE = "config.json"


_RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj")


@torch.no_grad()
def _init_like_tales(model: nn.Module, n_layers: int) -> None:
    """The `tales` transformer's initialisation (N(0, 1/d_in) weights, N(0, 1) embeddings,
    residual-writing projections shrunk by (2 L)^-1/2): Hugging Face's N(0, 0.02) default
    learns the induction behaviour far more slowly at this size."""
    scale = (2 * n_layers) ** -0.5
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=1.0)
        elif isinstance(mod, nn.Linear) or is_conv1d(mod):
            d_in = mod.in_features if isinstance(mod, nn.Linear) else mod.weight.shape[0]
            nn.init.normal_(mod.weight, std=d_in**-0.5)
            if name.rsplit(".", 1)[-1] in _RESIDUAL_WRITERS:
                mod.weight.mul_(scale)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)


class _TalesText:
    """The tales text and behaviours, served with the wrapped (Hugging Face) tokenizer."""

    def __init__(self, entry: TalesHFEntry) -> None:
        self.entry = entry

    @property
    def tokenizer(self) -> HFTokenizer:
        return self.entry.hf_tokenizer

    def dataset_text(self, index: int) -> str:
        return self.entry.dataset_text(index)

    def heldout_text(self, index: int) -> str:
        return self.entry.heldout_text(index)

    def n_documents(self, source: str) -> int | None:
        return None

    def behaviours(self) -> Any:
        return self.entry.behaviours()


class TalesHFEntry(TalesEntry):
    """Base of the tales targets on ``transformers`` architectures."""

    name = "tales-hf"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hf_tok: HFTokenizer | None = None

    def hf_config(self) -> Any:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(self.hf_config(),
                                                     attn_implementation="sdpa")
            _init_like_tales(model, self.kwargs.n_layers)
        return as_logits_model(model)

    def train_target(
        self, model: nn.Module, *, steps: int, device: str, seed: int, progress: Progress | None
    ) -> dict[str, float]:
        t0 = time.time()
        loss = train_tales_model(
            model, self.tokenizer, seed=seed, steps=steps, batch_size=self.kwargs.train_batch_size,
            device=device, lr=self.kwargs.train_lr, num_threads=None, progress=progress,
            grammar=self.kwargs.grammar, max_len=self.kwargs.max_len,
        )
        model.eval()
        scores = evaluate_behaviours(model, self.tokenizer, device=device,
                                     grammar=self.kwargs.grammar)
        return {"loss": loss, "seconds": time.time() - t0,
                **{f"top1/{k}": v for k, v in scores.items()}}

    # ---------------------------------------------------------------- tokenizer, files, export
    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The tales tokenizer as a ``PreTrainedTokenizerFast`` (same ids, word-level)."""
        if self._hf_tok is None:
            self._hf_tok = HFTokenizer(self.tokenizer.to_hf())
        return self._hf_tok

    def text_target(self) -> _TalesText:  # type: ignore[override]
        return _TalesText(self)

    def save_extras(self, run_dir: Path) -> None:
        """``hf/``: the model's config.json and the wrapped tokenizer (as for any Hugging Face
        run); the tales word list is the grammar's, rebuilt on load."""
        out = run_dir / RUN_SUBDIR
        out.mkdir()
        (out / CONFIG_FILE).write_text(json.dumps(self.hf_config().to_dict(), indent=1))
        self.hf_tokenizer.save(out)

    def load_extras(self, run_dir: Path) -> None:
        saved = HFTokenizer.load(run_dir / RUN_SUBDIR)
        if saved.vocab_size != self.tokenizer.vocab_size or any(
            saved.id_to_token(i) != self.tokenizer.id_to_token(i)
            for i in range(self.tokenizer.vocab_size)
        ):
            raise ValueError(f"{run_dir}: the saved tokenizer is not this grammar's")

    def save_native(self, state: dict[str, Tensor], out: Path) -> bool:
        save_pretrained_dir(self.build_model(), state, self.hf_tokenizer, out)
        return True

    def default_config(self) -> dict[str, Any]:
        cfg = super().default_config()
        cfg["target"] = {"zoo": self.name, "kwargs": {"grammar": self.kwargs.grammar}}
        return cfg


class TalesLlamaEntry(TalesHFEntry):
    name = "tales-llama"
    description = ("2-layer Hugging Face Llama (RoPE, grouped-query attention, SwiGLU) on the "
                   "tales corpus, with the tales behaviours")

    def hf_config(self) -> Any:
        from transformers import LlamaConfig

        k, tok = self.kwargs, self.tokenizer
        return LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=k.d_model, num_hidden_layers=k.n_layers,
            num_attention_heads=k.n_heads, num_key_value_heads=k.n_heads,
            intermediate_size=k.d_mlp or 3 * k.d_model, max_position_embeddings=k.max_len,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        )

    def default_config(self) -> dict[str, Any]:
        cfg = super().default_config()
        cfg["modules"] = [{"pattern": "*.attn.*", "C": 128}, {"pattern": "*.glu.*", "C": 128}]
        return cfg


class TalesGPT2Entry(TalesHFEntry):
    name = "tales-gpt2"
    description = ("2-layer Hugging Face GPT-2 (fused qkv, Conv1D, LayerNorm) on the tales "
                   "corpus, with the tales behaviours")

    def hf_config(self) -> Any:
        from transformers import GPT2Config

        k, tok = self.kwargs, self.tokenizer
        return GPT2Config(
            vocab_size=tok.vocab_size, n_positions=k.max_len, n_embd=k.d_model,
            n_layer=k.n_layers, n_head=k.n_heads, n_inner=k.d_mlp,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        )

    def default_config(self) -> dict[str, Any]:
        cfg = super().default_config()
        # canonical names: the fused qkv matrix (64 -> 192) gets the budget of q, k and v
        cfg["modules"] = [
            {"pattern": "*.attn.qkv", "C": 256},
            {"pattern": "*.attn.o", "C": 128},
            {"pattern": "*.mlp.*", "C": 128},
        ]
        return cfg
