"""Per-batch accumulation: one forward + CI pass updates every statistic and the reservoirs.

Everything is vectorised over the batch: bincounts / index_add for token statistics, priority
keys and window gathers for the examples; the firing events go to the co-firing log (counted when
the harvest is merged, see ``cofire.py``). Per-batch float sums are fp32 (torch's cascaded
summation), accumulated across batches in fp64.

The (tokens, S) work tensors (activations, CI, firing) are built for ``docs_per_chunk`` documents
of the batch at a time, at most ``CHUNK_ELEMENTS`` per tensor, so memory does not grow with
batch x context x components (a seed-size batch of 32 x 512 tokens x 40k components would be
2.7 GB per tensor). The chunking depends only on the batch's shape: a sharded harvest still
equals the unsharded one. Sparse token tables (``stats.py``) are updated from a buffer of
(component, token) pairs, merged when it outgrows the tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spd_mcp.model.session import RunSession
from spd_mcp.model.text import encode_document

from .cofire import FiringLog
from .config import HarvestConfig, HarvestError
from .reservoir import Examples, Reservoir, key_bits, priority_keys
from .stats import HarvestStats


def encode_doc(session: RunSession, index: int) -> list[int]:
    """Document ``index`` of the run's dataset: token ids (BOS first), truncated to context."""
    if not session.is_language_model:
        raise HarvestError(
            f"run {session.run.name!r} has no text dataset (not a language model); harvesting "
            "needs a language-model run such as 'tales'"
        )
    return encode_document(session, session.require_lm().dataset_text(index))


def pad_batch(session: RunSession, rows: list[list[int]], docs: list[int]
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids (B, T), lengths (B,) and doc indices (B,) on the session device."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), session.tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    dev = session.device
    return ids.to(dev), lengths.to(dev), torch.tensor(docs, dtype=torch.long, device=dev)


def make_batch(session: RunSession, docs: range) -> tuple[Tensor, Tensor, Tensor]:
    """The padded batch of documents ``docs``."""
    return pad_batch(session, [encode_doc(session, d) for d in docs], list(docs))


CHUNK_ELEMENTS = 1 << 25
"""Elements of each (tokens, S) work tensor per chunk (128 MB in fp32)."""
PAIR_BUFFER = 1 << 22
"""Buffered (component, token) pairs before a merge into sparse token tables (at least)."""


def docs_per_chunk(T: int, S: int) -> int:
    """Documents of T tokens processed together so each (tokens, S) tensor stays small."""
    return max(1, CHUNK_ELEMENTS // max(T * S, 1))


class Workspace:
    """Reusable scratch buffers: fresh multi-MB tensors every batch cost page faults."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


class Accumulator:
    """Streaming harvest state for one run and config: statistics plus example reservoirs; the
    firing events go to ``log`` when one is given (a shard's co-firing needs it)."""

    def __init__(self, session: RunSession, config: HarvestConfig,
                 log: FiringLog | None = None) -> None:
        if config.fire_threshold is None:
            raise HarvestError("resolve the config (fire_threshold) before harvesting")
        self.session = session
        self.config = config
        self.modules = [session.to_module[layer] for layer in session.layers]
        Cs = [session.keys.Cs[layer] for layer in session.layers]
        dev = session.device
        self._stats = HarvestStats.zeros(session.layers, Cs, session.tokenizer.vocab_size, dev)
        self._pairs: dict[str, list[Tensor]] = {"fire_token": [], "fire_pred": []}
        self.S = self._stats.n_components
        if (session.max_len or 0) >= 1 << 23 or self.S >= 1 << 40:
            raise HarvestError("priority keys pack (pos, component) into 63 bits: too large")
        self.offsets = self._stats.offsets
        self.bits = key_bits(self.S)
        self.reservoir = Reservoir(self.S, config.n_examples, config.window_len, dev)
        self.ws = Workspace(dev)
        self.log = log

    @property
    def stats(self) -> HarvestStats:
        """The statistics so far (buffered token pairs merged in)."""
        self._flush_pairs()
        return self._stats

    def _flush_pairs(self, at_least: int = 0) -> None:
        """Merge buffered (component·V + token) keys into the sparse token tables once the
        buffer holds ``at_least`` pairs (0: always)."""
        st, V = self._stats, self._stats.vocab_size
        for name, keys in self._pairs.items():
            n = sum(len(k) for k in keys)
            if n == 0 or n < at_least:
                continue
            k, c = torch.cat(keys).unique(return_counts=True)
            st.add_pairs(name, k // V, k % V, c)
            keys.clear()

    @property
    def examples(self) -> Examples:
        return self.reservoir.examples()

    # ---------------------------------------------------------------------------- state I/O
    def state(self) -> dict[str, Tensor]:
        out = {f"stats.{k}": v for k, v in self.stats.tensors().items()}
        out.update({f"examples.{k}": v.cpu().contiguous()
                    for k, v in self.examples.tensors().items()})
        return out

    def load_state(self, t: dict[str, Tensor]) -> None:
        dev = self.session.device
        st = {k[len("stats."):]: v for k, v in t.items() if k.startswith("stats.")}
        s = self._stats
        self._stats = HarvestStats.from_tensors(st, s.layers, s.offsets, s.vocab_size).to(dev)
        for keys in self._pairs.values():
            keys.clear()
        self.reservoir.load(Examples.from_tensors(t, "examples."))

    # ------------------------------------------------------------------------------ a batch
    @torch.inference_mode()
    def process(self, ids: Tensor, lengths: Tensor, docs: Tensor) -> int:
        """Update everything from one right-padded batch; returns the number of tokens."""
        logits, inputs, _ = self.session.cm.forward_with_inputs(ids)
        B, T = ids.shape
        pred = logits.argmax(-1)  # (B, T) the target's top-1 prediction
        del logits
        step = docs_per_chunk(T, self.S)
        N, events = 0, []
        for a in range(0, B, step):
            rows = slice(a, a + step)
            part = {m: x[rows] for m, x in inputs.items()}
            n, tok_row, comp = self._process_docs(ids[rows], lengths[rows], docs[rows],
                                                  pred[rows], part)
            events.append((tok_row + N, comp))
            N += n
        if self.log is not None:  # one record per batch, however it was chunked
            self.log.append(N, torch.cat([e[0] for e in events]), torch.cat([e[1] for e in events]))
        if not self._stats.sparse_tokens:
            return N
        nnz = int(self._stats.t["fire_token_n"].numel())
        self._flush_pairs(at_least=max(PAIR_BUFFER, nnz))
        return N

    def _process_docs(self, ids: Tensor, lengths: Tensor, docs: Tensor, pred_bt: Tensor,
                      inputs: dict[str, Tensor]) -> tuple[int, Tensor, Tensor]:
        """Statistics and reservoirs of some documents of a batch; (tokens, firing events as
        (token row among these documents' tokens, component)) for the firing log."""
        cfg, cm, stats = self.config, self.session.cm, self._stats
        st = stats.t
        S, V = self.S, stats.vocab_size
        B, T = ids.shape
        BT = B * T
        dev = ids.device
        # component activations (B*T, S), written into a reused buffer
        acts_all = self.ws.get("acts", (BT, S), torch.float32)
        acts = {}
        for m, a, b in zip(self.modules, self.offsets, self.offsets[1:], strict=False):
            comp, x = cm.component(m), inputs[m]
            if comp.kind == "linear":  # component_acts: x @ V
                torch.matmul(x.reshape(BT, -1), comp.V, out=acts_all[:, a:b])
            else:
                acts_all[:, a:b] = comp.component_acts(x).reshape(BT, -1)
            acts[m] = acts_all[:, a:b].view(B, T, b - a)

        valid = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).reshape(-1)  # (B*T,)
        rows = valid.nonzero().squeeze(1)  # (N,) flat (b, t) of real tokens
        N = int(rows.numel())
        # CI (B*T, S), pads zeroed so they never fire; clamp(z, 0, 1) is the forward of
        # lower_leaky_hard_sigmoid, written into place layer by layer.
        pre = cm.ci_fns(inputs, acts)
        ci_all = self.ws.get("ci", (BT, S), torch.float32)
        for m, a, b in zip(self.modules, self.offsets, self.offsets[1:], strict=False):
            torch.clamp(pre[m].reshape(BT, -1), 0.0, 1.0, out=ci_all[:, a:b])
        del pre
        ci_all.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
        fire = torch.gt(ci_all, cfg.fire_threshold, out=self.ws.get("fire", (BT, S), torch.bool))
        rf, c = fire.nonzero(as_tuple=True)  # events: flat (b, t) position, component
        ci_ev = ci_all.view(-1)[rf * S + c]
        act_ev = acts_all.view(-1)[rf * S + c]
        b_ev, t_ev = rf // T, rf % T
        start = torch.cumsum(lengths, 0) - lengths

        tok = ids.reshape(-1)
        pred = pred_bt.reshape(-1)
        fire_batch = torch.bincount(c, minlength=S)
        stats.n_tokens += N
        st["fire_count"] += fire_batch
        st["sum_ci"] += ci_all.sum(0).double()
        st["sum_act"] += (valid.to(torch.float32) @ acts_all).double()
        st["sum_ci_fire"].index_add_(0, c, ci_ev.double())
        st["sum_act_fire"].index_add_(0, c, act_ev.double())
        st["max_abs_act_fire"].scatter_reduce_(0, c, act_ev.abs().double(), "amax")
        if "pos_fire_count" in st:  # absent when resuming a checkpoint from before the field
            st["pos_fire_count"] += torch.bincount(c[act_ev > 0], minlength=S)
        st["token_count"] += torch.bincount(tok[rows], minlength=V)
        st["pred_count"] += torch.bincount(pred[rows], minlength=V)
        if stats.sparse_tokens:
            self._pairs["fire_token"].append(c * V + tok[rf])
            self._pairs["fire_pred"].append(c * V + pred[rf])
        else:
            stats.add_pairs("fire_token", c, tok[rf])
            stats.add_pairs("fire_pred", c, pred[rf])

        doc_ev = docs[b_ev]
        key = priority_keys(cfg.seed, doc_ev, t_ev, c, self.bits)
        ev, row, slot = self.reservoir.offer(c, key, doc_ev, t_ev)
        if len(ev):
            self.reservoir.fill(row, slot, act=act_ev[ev],
                                **self._windows(ids, lengths, ci_all, b_ev[ev], t_ev[ev], c[ev]))
        return N, start[b_ev] + t_ev, c

    def _windows(self, ids: Tensor, lengths: Tensor, ci_all: Tensor, b: Tensor, t: Tensor,
                 c: Tensor) -> dict[str, Tensor]:
        """Windows of W tokens around events, shifted to stay inside the document at its edges:
        offset of the firing token, token ids (-1 past the end), this component's CI."""
        W, w = self.config.window_len, self.config.window
        T = ids.shape[1]
        L = lengths[b]
        lo = torch.minimum((t - w).clamp(min=0), (L - W).clamp(min=0))  # window start
        p = lo[:, None] + torch.arange(W, device=ids.device)[None, :]  # (M, W)
        inside = p < L[:, None]
        pc = torch.minimum(p, (L - 1)[:, None])
        flat = b[:, None] * T + pc  # (M, W) flat (b, t)
        tokens = torch.where(inside, ids.reshape(-1)[flat], -1)
        ci = torch.where(inside, ci_all.view(-1)[flat * self.S + c[:, None]], 0.0)
        return {"offset": t - lo, "tokens": tokens.to(torch.int32), "ci": ci}
