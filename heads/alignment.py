"""The alignment head: pooled sentence states -> one logit per (answer, note) sentence pair.

The backbone reads the whole case once (prompt with numbered note sentences, then the
answer); the head pools its hidden states over every note-sentence span and every
answer-sentence span, and scores all pairs of the case at once:

    a = Pa(LN(pool(answer span)))    n = Pn(LN(pool(note span)))
    logit(a, n) = MLP([a, n, a*n, |a-n|])

``a*n`` and ``|a-n|`` let a small MLP express both similarity and learned
associations that share no surface words. An optional relevance logit per note
sentence (evidence identification) comes from the same note vectors.

Pooling is vectorised: every span becomes a row of a [spans, B*T] weight matrix
(uniform weights for mean pooling, a masked softmax of learned token scores for
attention pooling), and one matmul pools all spans of a batch. Parameters are fp32;
hidden states are upcast on entry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .config import HeadConfig

# Before training a pair is rarely a link (about 1 in 10 in ArchEHR-QA); starting the
# pair logit there keeps the first BCE steps from being dominated by the prior.
PRIOR_POSITIVE_RATE = 0.1


class HeadOutput(NamedTuple):
    pair_logits: torch.Tensor  # [n_answer, n_note]
    relevance_logits: torch.Tensor | None  # [n_note] or None


def spans_tensor(spans: Sequence[Sequence[int]] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[S, 3] (batch row, start, end) long tensor from [S,2] or [S,3] spans (lists or tensors)."""
    t = torch.as_tensor(spans, device=device)  # a tensor moves; a list becomes one (made long below)
    if t.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.long, device=device)
    if t.dim() != 2 or t.shape[1] not in (2, 3):
        raise ValueError(f"spans must be [S,2] or [S,3], got shape {tuple(t.shape)}")
    if t.shape[1] == 2:
        t = torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)
    return t.long()


def pair_rows(answer_at: int, note_at: int, n_answers: int, n_notes: int) -> list[tuple[int, int]]:
    """One example's pairs as (answer span, note span) rows of the stacked span tensors, its
    spans starting at rows ``answer_at`` / ``note_at``: row-major, the order of its
    [n_answers, n_notes] pair logits (:meth:`NotePairHead.forward_pairs`' ``pair_index``)."""
    return [(answer_at + a, note_at + k) for a in range(n_answers) for k in range(n_notes)]


class NotePairHead(nn.Module):
    def __init__(
        self,
        hidden_size: int | HeadConfig,
        proj_dim: int = HeadConfig.proj_dim,
        pooling: str = HeadConfig.pooling,
        relevance: bool = HeadConfig.relevance,
        mlp_dim: int | None = None,
        dropout: float = HeadConfig.dropout,
        layer: int = HeadConfig.layer,
    ):
        super().__init__()
        if isinstance(hidden_size, HeadConfig):
            cfg = hidden_size
        else:
            cfg = HeadConfig(
                hidden_size=hidden_size,
                proj_dim=proj_dim,
                mlp_dim=mlp_dim or proj_dim,
                pooling=pooling,
                relevance=relevance,
                dropout=dropout,
                layer=layer,
            )
        self.config = cfg
        h, d, m = cfg.hidden_size, cfg.proj_dim, cfg.mlp_dim
        self.token_scorer = nn.Linear(h, 1) if cfg.pooling == "attention" else None
        self.norm = nn.LayerNorm(h)
        self.answer_proj = nn.Linear(h, d)
        self.note_proj = nn.Linear(h, d)
        self.pair_mlp = nn.Sequential(nn.Linear(4 * d, m), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(m, 1))
        self.relevance_mlp = (
            nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(m, 1))
            if cfg.relevance
            else None
        )
        prior = math.log(PRIOR_POSITIVE_RATE / (1 - PRIOR_POSITIVE_RATE))
        last = self.pair_mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.constant_(last.bias, prior)
        self.float()

    # --- pooling -----------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Pool ``hidden`` [B,T,H] (or [T,H]) over ``spans`` [S,3] (or [S,2]) -> [S,H] fp32."""
        if hidden.dim() == 2:
            hidden = hidden.unsqueeze(0)
        b, t, h = hidden.shape
        spans = spans_tensor(spans, hidden.device)
        if spans.shape[0] == 0:
            return hidden.new_zeros((0, h), dtype=torch.float32)
        flat = hidden.reshape(b * t, h).float()
        pos = torch.arange(t, device=hidden.device)
        rows, starts, ends = spans[:, 0], spans[:, 1], spans[:, 2]
        inside = (pos[None, :] >= starts[:, None]) & (pos[None, :] < ends[:, None])  # [S, T]
        member = inside[:, None, :] & (torch.arange(b, device=hidden.device)[None, :, None] == rows[:, None, None])
        member = member.reshape(spans.shape[0], b * t)  # [S, B*T]
        if self.token_scorer is None:
            weights = member.float() / member.sum(dim=1, keepdim=True).clamp(min=1).float()
        else:
            scores = self.token_scorer(flat).squeeze(-1)  # [B*T]
            scores = scores[None, :].masked_fill(~member, float("-inf"))
            weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # an empty span pools to zeros
        return weights @ flat

    # --- scoring -----------------------------------------------------------------
    def pair_logit(self, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Projected answer and note vectors [..., d] (broadcast against each other) -> logits [...]."""
        a, n = torch.broadcast_tensors(a, n)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return self.pair_mlp(torch.cat([a, n, a * n, (a - n).abs()], dim=-1)).squeeze(-1)

    def score(self, answer_vecs: torch.Tensor, note_vecs: torch.Tensor) -> HeadOutput:
        """Pooled [n_a,H] and [n_n,H] -> pair logits [n_a,n_n] (+ relevance [n_n])."""
        a = self.answer_proj(self.norm(answer_vecs))
        n = self.note_proj(self.norm(note_vecs))
        pair = self.pair_logit(a[:, None, :], n[None, :, :])
        rel = self.relevance_mlp(n).squeeze(-1) if self.relevance_mlp is not None else None
        return HeadOutput(pair, rel)

    def forward_pairs(
        self,
        hidden_states: torch.Tensor,
        note_spans: torch.Tensor,
        answer_spans: torch.Tensor,
        pair_index: torch.Tensor,
    ) -> HeadOutput:
        """A batch of several examples at once, with no per-example loop or host sync (training):
        spans [S,3]/[M,3], ``pair_index`` [P,2] (answer span, note span) rows -> pair logits [P]
        and relevance logits over all S notes. Same values as :meth:`forward_batch` per pair."""
        a = self.answer_proj(self.norm(self.pool(hidden_states, answer_spans)))
        n = self.note_proj(self.norm(self.pool(hidden_states, note_spans)))
        pair = self.pair_logit(a.index_select(0, pair_index[:, 0]), n.index_select(0, pair_index[:, 1]))
        rel = self.relevance_mlp(n).squeeze(-1) if self.relevance_mlp is not None else None
        return HeadOutput(pair, rel)

    def forward(
        self,
        hidden_states: torch.Tensor,
        note_spans: torch.Tensor,
        answer_spans: torch.Tensor,
        note_counts: Sequence[int] | None = None,
        answer_counts: Sequence[int] | None = None,
        pair_index: torch.Tensor | None = None,
    ) -> HeadOutput | tuple[list[torch.Tensor], torch.Tensor | None]:
        """One case: hidden [T,H] or [1,T,H], spans as [(start,end), ...] -> HeadOutput.
        With ``pair_index``: :meth:`forward_pairs`; with ``note_counts``/``answer_counts``:
        :meth:`forward_batch` (both through ``forward`` so that FSDP, which gathers a sharded
        unit's weights only around ``forward``, sees the call)."""
        if pair_index is not None:
            return self.forward_pairs(hidden_states, note_spans, answer_spans, pair_index)
        if note_counts is not None:
            assert answer_counts is not None, "note_counts and answer_counts come together"
            return self.forward_batch(hidden_states, note_spans, note_counts, answer_spans, answer_counts)
        note_vecs = self.pool(hidden_states, note_spans)
        answer_vecs = self.pool(hidden_states, answer_spans)
        return self.score(answer_vecs, note_vecs)

    def forward_batch(
        self,
        hidden_states: torch.Tensor,
        note_spans: torch.Tensor,
        note_counts: Sequence[int],
        answer_spans: torch.Tensor,
        answer_counts: Sequence[int],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A padded batch: spans [S,3]/[M,3] grouped by example (counts per row) ->
        per-example pair logits [n_a_i, n_n_i] and relevance logits over all S notes."""
        note_vecs = self.pool(hidden_states, note_spans)
        answer_vecs = self.pool(hidden_states, answer_spans)
        pair_logits, rel_parts = [], []
        n0 = a0 = 0
        for nn_count, na_count in zip(note_counts, answer_counts):
            nn_count, na_count = int(nn_count), int(na_count)
            out = self.score(answer_vecs[a0 : a0 + na_count], note_vecs[n0 : n0 + nn_count])
            pair_logits.append(out.pair_logits)
            if out.relevance_logits is not None:
                rel_parts.append(out.relevance_logits)
            n0 += nn_count
            a0 += na_count
        relevance = torch.cat(rel_parts) if rel_parts else None
        return pair_logits, relevance


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"


def save_head(head: NotePairHead, out_dir: str | Path) -> None:
    """``head.safetensors`` + ``head_config.json`` in ``out_dir``."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS), metadata={"format": "pt"})
    head.config.save(out / HEAD_CONFIG)


def load_head(in_dir: str | Path, device: torch.device | str | None = None) -> NotePairHead:
    """Rebuild a head saved by :func:`save_head` (strict: every weight must match)."""
    from pathlib import Path

    from safetensors.torch import load_file

    src = Path(in_dir)
    head = NotePairHead(HeadConfig.load(src / HEAD_CONFIG))
    head.load_state_dict(load_file(str(src / HEAD_WEIGHTS)), strict=True)
    return head.to(device) if device is not None else head
