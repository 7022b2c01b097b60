"""A local Hugging Face causal LM as a target: load it (local files only), make it return
logits, infer its topology, and serve its tokenizer and text to the text tools.

A run stores the model's ``config.json`` and tokenizer under ``hf/`` in the run directory and the
weights in ``target.safetensors``, so a saved run loads without the original directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from spd_mcp.model.adapter import TargetAdapter
from spd_mcp.model.config import HFTarget, TextData, TopologySpec
from spd_mcp.model.hf.data import TextDocuments
from spd_mcp.model.hf.families import infer_spec
from spd_mcp.model.hf.tokenizer import HFTokenizer, HFTokenizerError
from spd_mcp.model.topology import Topology
from spd_mcp.model.weights import TargetError

RUN_SUBDIR = "hf"
"""Where a run keeps the model's config.json and its tokenizer files."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_local_dir(path: str) -> Path:
    """The model directory; a hub name or a missing path is an error that says what to do."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TargetError(f"target.huggingface: {p} has no config.json; give a directory "
                              "written by `model.save_pretrained(DIR)`")
        return p
    hint = ""
    if _HUB_NAME.match(path) and not path.startswith((".", "/", "~")):
        hint = (f" It looks like a Hugging Face hub name: spd-mcp never downloads. Save it "
                f"first: AutoModelForCausalLM.from_pretrained({path!r}).save_pretrained(DIR) and "
                f"AutoTokenizer.from_pretrained({path!r}).save_pretrained(DIR), then use DIR.")
    raise TargetError(f"target.huggingface: {path!r} is not a local directory.{hint}")


def _logits_only(_m: nn.Module, _args: tuple, out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def as_logits_model(model: nn.Module) -> nn.Module:
    """Make ``model(ids)`` return the logits tensor (B, T, V), with no KV cache, in eval mode.
    The module tree (and so every module path and state-dict key) stays the model's own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no advice about padding masks: batches pad on the right
    if not getattr(model, "_spd_mcp_logits", False):
        model.register_forward_hook(_logits_only)
        model._spd_mcp_logits = True  # type: ignore[assignment]
    model.config.use_cache = False  # type: ignore[attr-defined]
    return model.eval()


def load_model(
    directory: Path, *, weights: dict[str, Tensor] | None = None
) -> nn.Module:
    """The causal LM in ``directory`` (fp32, SDPA attention). With ``weights``, the architecture
    comes from the directory's config.json and the weights from the dict (a run's)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def load(attn: str) -> nn.Module:
        if weights is None:
            return AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, dtype=torch.float32,
                attn_implementation=attn)
        cfg = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                attn_implementation=attn)

    try:
        try:
            model = load("sdpa")  # graphs' fast attention strategy reads SDPA calls
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise
            model = load("eager")  # correct, but graphs fall back to the general strategy
    except (OSError, ValueError, KeyError) as e:
        raise TargetError(f"cannot load a causal LM from {directory}: {e}") from None
    return as_logits_model(model)


def hf_topology(model: nn.Module, spec: TopologySpec) -> Topology:
    """The topology of a Hugging Face model from its topology section and its config."""
    cfg = model.config  # type: ignore[attr-defined]
    d_model = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    max_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return Topology.from_spec(spec, d_model=d_model, max_len=max_len)


def save_pretrained_dir(model: nn.Module, state: dict[str, Tensor], tokenizer: HFTokenizer,
                        out: Path) -> None:
    """``model`` with weights ``state`` and its tokenizer as a directory that
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load."""
    from spd_mcp.model.weights import load_state_strict

    load_state_strict(model, state, source="edited weights")
    model.config.use_cache = True  # type: ignore[attr-defined]
    model.save_pretrained(str(out))  # type: ignore[attr-defined]
    tokenizer.save(out)


class HFText:
    """The :class:`~spd_mcp.model.text_target.TextTarget` of a Hugging Face target."""

    def __init__(self, tokenizer: HFTokenizer, docs: TextDocuments | None) -> None:
        self._tok = tokenizer
        self.docs = docs

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tok

    def _need_docs(self) -> TextDocuments:
        if self.docs is None:
            raise TargetError("this run has no text data (`data: {text: FILE}` in its config)")
        return self.docs

    def dataset_text(self, index: int) -> str:
        train = self._need_docs().train
        return train[index % len(train)]

    def heldout_text(self, index: int) -> str:
        held = self._need_docs().heldout
        return held[index % len(held)]

    def n_documents(self, source: Literal["train", "heldout"]) -> int | None:
        docs = self._need_docs()
        return len(docs.train if source == "train" else docs.heldout)

    def behaviours(self) -> Mapping[str, Any]:
        return {}


class HFAdapter(TargetAdapter):
    """Target adapter of a ``target: {huggingface: DIR}`` config."""

    output_loss: ClassVar[Literal["mse", "kl"]] = "kl"

    def __init__(self, spec: HFTarget, data: TextData | None, *,
                 tokenizer: Path | None = None) -> None:
        self.spec = spec
        self.data = data
        self.tokenizer_path = tokenizer
        """A tokenizer elsewhere than the model directory (imports)."""
        self.source: Path | None = None
        self._tokenizer: HFTokenizer | None = None
        self._text: HFText | None = None

    # ------------------------------------------------------------------------------- loading
    def load_extras(self, run_dir: Path) -> None:
        self.source = run_dir / RUN_SUBDIR

    def build(self, weights: dict[str, Tensor] | None) -> tuple[nn.Module, Topology]:
        directory = self.source or check_local_dir(self.spec.huggingface)
        model = load_model(directory, weights=weights)
        self._tokenizer = self._load_tokenizer(self.tokenizer_path or directory, model)
        topo = hf_topology(model, infer_spec(model, self.spec.topology))
        docs = (TextDocuments(self.data, self._tokenizer.encode) if self.data is not None
                else None)
        self._text = HFText(self._tokenizer, docs)
        return model, topo

    @staticmethod
    def _load_tokenizer(directory: Path, model: nn.Module) -> HFTokenizer:
        try:
            tok = HFTokenizer.load(directory)
        except HFTokenizerError as e:
            raise TargetError(f"{e}; save the tokenizer beside the model "
                              "(tokenizer.save_pretrained(DIR))") from None
        n_emb = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        if tok.vocab_size > n_emb:
            raise TargetError(
                f"tokenizer/model mismatch in {directory}: the tokenizer has {tok.vocab_size} "
                f"tokens but the model's embedding only {n_emb}; they are not a pair"
            )
        return tok

    def save_extras(self, run_dir: Path) -> None:
        directory = self.source or check_local_dir(self.spec.huggingface)
        out = run_dir / RUN_SUBDIR
        out.mkdir()
        (out / "config.json").write_bytes((directory / "config.json").read_bytes())
        assert self._tokenizer is not None, "build() first"
        self._tokenizer.save(out)

    def save_native(self, state: dict[str, Tensor], out: Path) -> bool:
        """``save_pretrained`` files (config, weights) and the tokenizer: a directory that
        ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load."""
        directory = self.source or check_local_dir(self.spec.huggingface)
        assert self._tokenizer is not None, "build() first"
        save_pretrained_dir(load_model(directory, weights=state), state, self._tokenizer, out)
        return True

    # ----------------------------------------------------------------------------------- data
    def text_target(self) -> HFText | None:
        return self._text

    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        assert self._text is not None and self._text.docs is not None
        return self._text.docs.windows(batch_size, device)
