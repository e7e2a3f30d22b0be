"""SAFFU: a self-attentive feed-forward unit whose every softmax layer has an explicit solution.

"Explicit Foundation Model Optimization with Self-Attentive Feed-Forward Neural Units" (Williams &
Zhao, arXiv 2311.07510). The paper body was not available to us (shared/papers/saffu.md), so what
follows is our reading; every choice the sources leave open is marked **ours**.

**The explicit solution of one softmax layer.** For p = softmax(x W) on non-negative features x
trained with cross-entropy against targets y (one-hot or distributions), the gradient vanishes
where the model's expected co-occurrence equals the empirical generalised co-occurrence
Φ = Σ_t x_tᵀ y_t (features × classes). For one-hot x that point is exactly

    W_fj = log Φ_fj / Σ_j' Φ_fj'          (the log conditional probability of class j given f)

up to a per-row shift softmax ignores. For features with L1 mass K (K one-hot blocks, a window of
K tokens) we divide by K (ours, from the paper's "geometric mean" wording): the logits are the
mean of the blocks' log conditionals, the softmax of a geometric mean of K distributions. Zero
counts are smoothed by `eps` (ours: 1e-3 of a count, as the authors' earlier IaMaN code).

**The unit (ours where marked).** Frozen non-negative token embeddings E (V × b, rows of L1 mass 1:
one-hot, or bit-cipher codes of b bits by frequency rank, Zhao & Williams arXiv 2311.11012, our
reading); a window of the K most recent tokens (the current one first; positions before the
document start are zero vectors); x_t = [E w_t, E w_{t−1}, …, E w_{t−K+1}] (K·b, "cat"
aggregation).

    a_t = softmax_k(x_t W_A)                 attention over the K window positions (K·b × K)
    h_t = Σ_k a_tk · E w_{t−k}               the attended token features (b, mass 1)
    p_t = softmax([h_t, x_t] W_F)            the feed-forward unit, softmax activation (… × V)

- One full-rank matrix W_A maps the whole window (query and keys together, the reviewers' "X Xᵀ W"
  order) to position scores, in place of W_q W_kᵀ.
- Targets of the hidden softmax (ours; the paper's are not known): the attention layer is solved
  against "which window positions hold the next token" (a distribution over the matching
  positions; no target where none matches), the feed-forward layer against the next token.
- Left out: the log applied to the attention weights before the values (it would make h negative,
  and the explicit solution needs non-negative features), several heads (solved against the same
  targets they would be identical), stacked units (the paper's models are single-block).

`solve` sets W_A, then W_F (on features computed with the solved W_A) from one counting pass each
over the training documents: the warm start. Backprop then trains W_A and W_F (E stays frozen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutput

EMBEDDINGS = ("onehot", "bitcipher")


class SAFFUConfig(PreTrainedConfig):
    """A SAFFU language model: frozen embeddings, one attention + softmax feed-forward unit."""

    model_type = "zoo_saffu"

    # Vocabulary size V (the byte tokenizer's by default).
    vocab_size: int = 259
    # Window K: the current token and the K − 1 before it.
    context_radius: int = 4
    # Token features: "onehot" (b = V) or "bitcipher" (b = embedding_bits, frequency-ranked codes).
    embedding: str = "onehot"
    # Bits b of the bit-cipher embedding.
    embedding_bits: int = 16
    # Count added to every co-occurrence cell before the log (smoothing of unseen pairs).
    eps: float = 1e-3
    # Std of the random (cold-start) init of W_A and W_F.
    initializer_range: float = 0.02
    # One SAFFU unit (transformers' generation asks for the depth).
    num_hidden_layers: int = 1
    # No decode cache: each step reruns the windowed unit (`generate` reads this).
    use_cache: bool = False
    # Fingerprint of the data the model was solved on (its tokenizer), set by `solve`.
    vocab_fingerprint: str | None = None
    pad_token_id: int | None = 258
    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs) -> None:
        for name in ("vocab_size", "context_radius", "embedding_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding={self.embedding!r} is not one of {list(EMBEDDINGS)}")
        if self.embedding == "bitcipher" and 2**self.embedding_bits - 1 < self.vocab_size:
            raise ValueError(
                f"embedding_bits={self.embedding_bits} gives {2**self.embedding_bits - 1} codes, "
                f"fewer than vocab_size={self.vocab_size}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps!r} must be positive")
        super().__post_init__(**kwargs)

    @property
    def feature_size(self) -> int:
        """b: features per token."""
        return self.vocab_size if self.embedding == "onehot" else self.embedding_bits


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenDocuments:
    """Tokenized documents and the vocabulary they were tokenized with."""

    documents: tuple[tuple[int, ...], ...]
    vocab_size: int
    fingerprint: str
    """Identifies the tokenizer: solving and training data must share it."""

    def __post_init__(self) -> None:
        if not self.documents or not any(self.documents):
            raise ValueError("the corpus is empty: no document has a token")
        for i, doc in enumerate(self.documents):
            bad = [t for t in doc if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"document {i} has token id {bad[0]} outside the vocabulary [0, "
                    f"{self.vocab_size})"
                )

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.documents)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> TokenDocuments:
        """Each text tokenized with bos and eos (as `zoo.data.pack_tokens`, but kept apart)."""
        from zoo.data import tokenizer_fingerprint

        if not texts:
            raise ValueError("the corpus is empty: no documents")
        encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        eos = tokenizer.eos_token_id
        docs = tuple(tuple(ids) + ((eos,) if eos is not None else ()) for ids in encoded)
        return cls(docs, len(tokenizer), tokenizer_fingerprint(tokenizer))

    def truncated(self, tokens: int) -> TokenDocuments:
        """The first documents holding `tokens` tokens (the last one cut)."""
        kept, left = [], tokens
        for doc in self.documents:
            if left <= 0:
                break
            kept.append(doc[:left])
            left -= len(kept[-1])
        return TokenDocuments(tuple(kept), self.vocab_size, self.fingerprint)

    def windows(self, seq_len: int) -> list[torch.Tensor]:
        """Each document in pieces of at most `seq_len` tokens (a piece sees only its own
        document, as in solving)."""
        return [
            torch.tensor(doc[i : i + seq_len])
            for doc in self.documents
            for i in range(0, len(doc), seq_len)
            if len(doc[i : i + seq_len]) > 1
        ]


def check_context(config: SAFFUConfig, corpus: TokenDocuments) -> None:
    longest = max(len(d) for d in corpus.documents)
    if config.context_radius > longest:
        raise ValueError(
            f"context_radius={config.context_radius} is longer than any document (the longest "
            f"has {longest} tokens): every window would be mostly padding"
        )


def check_vocabulary(config: SAFFUConfig, corpus: TokenDocuments, what: str) -> None:
    if corpus.vocab_size != config.vocab_size:
        raise ValueError(
            f"{what} data has vocab_size={corpus.vocab_size}, the model {config.vocab_size}"
        )
    if config.vocab_fingerprint is not None and corpus.fingerprint != config.vocab_fingerprint:
        raise ValueError(
            f"{what} data was tokenized with another vocabulary (fingerprint "
            f"{corpus.fingerprint}) than the model was solved on ({config.vocab_fingerprint})"
        )


# -- embeddings and the explicit solution ------------------------------------------------------


def bit_cipher(ranks: torch.Tensor, bits: int) -> torch.Tensor:
    """(V, bits) codes: the token of frequency rank r gets the r-th non-zero bit vector in order
    of popcount, then lexicographically (frequent tokens get sparse codes), L1-normalised."""
    codes = []
    for ones in range(1, bits + 1):
        for positions in combinations(range(bits), ones):
            codes.append(positions)
            if len(codes) == len(ranks):
                break
        if len(codes) == len(ranks):
            break
    table = torch.zeros(len(ranks), bits, device=ranks.device)
    for token, rank in enumerate(ranks.tolist()):
        table[token, list(codes[rank])] = 1.0 / len(codes[rank])
    return table


def explicit_softmax_solution(cooccurrence: torch.Tensor, mass: float, eps: float) -> torch.Tensor:
    """W = (1/mass) · log((Φ + eps) / rowsum(Φ + eps)): the stationary point of softmax(x W) for
    one-hot x (mass 1), and the geometric-mean form for features of L1 mass `mass`."""
    smoothed = cooccurrence.double() + eps
    return (smoothed / smoothed.sum(-1, keepdim=True)).log().div(mass).float()


def _lagged(x: torch.Tensor, K: int, fill: float) -> torch.Tensor:
    """(B, T, K, C) windows of x (B, T, C): entry [:, t, k] is x[:, t − k], `fill` before t = 0."""
    T = x.shape[1]
    padded = F.pad(x, (0, 0, K - 1, 0), value=fill)  # (B, K−1+T, C)
    return torch.stack([padded[:, K - 1 - k : K - 1 - k + T] for k in range(K)], dim=2)


# -- the model ------------------------------------------------------------------------------------


class SAFFUForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SAFFUConfig
    base_model_prefix = "saffu"
    _supports_cache_class = False

    def __init__(self, config: SAFFUConfig) -> None:
        super().__init__(config)
        V, K, b = config.vocab_size, config.context_radius, config.feature_size
        # Frozen features: a buffer, saved with the weights (bit-cipher codes depend on the data).
        # Under from_pretrained's meta device the codes are computed on the CPU, then loaded over.
        ranks = torch.arange(V, device="cpu")
        embedding = torch.eye(V) if config.embedding == "onehot" else bit_cipher(ranks, b)
        self.register_buffer("embedding", embedding, persistent=True)
        self.attention = nn.Parameter(torch.empty(K * b, K))  # W_A
        self.feed_forward = nn.Parameter(torch.empty((K + 1) * b, V))  # W_F
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            from transformers import initialization as init

            std = self.config.initializer_range
            init.normal_(self.attention, mean=0.0, std=std)
            init.normal_(self.feed_forward, mean=0.0, std=std)

    def window(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, K, b) features of each position's window and the (B, T, K) mask of positions
        inside the sequence (position k of token t is token t − k)."""
        K = self.config.context_radius
        windows = _lagged(self.embedding[input_ids], K, 0.0)  # (B, T, K, b)
        T = input_ids.shape[1]
        inside = torch.arange(T, device=input_ids.device)[:, None] >= torch.arange(K)[None, :]
        return windows, inside.expand(input_ids.shape[0], T, K)

    def attend(self, windows: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """The attention weights a (B, T, K) over window positions inside the sequence."""
        scores = windows.flatten(2) @ self.attention  # (B, T, K)
        return torch.softmax(scores.masked_fill(~inside, -math.inf), dim=-1)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """u_t = [h_t, x_t] (B, T, (K+1)·b): the feed-forward layer's input."""
        windows, inside = self.window(input_ids)
        weights = self.attend(windows, inside)
        attended = (weights.unsqueeze(-1) * windows).sum(2)  # (B, T, b)
        return torch.cat([attended, windows.flatten(2)], dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Next-token logits (log-probabilities); with `labels` (shifted inside, −100 ignored),
        the loss. Each row is one document piece: windows never look before its first token."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("SAFFU windows take no padding: pass unpadded rows")
        logits = torch.log_softmax(self.features(input_ids) @ self.feed_forward, dim=-1)
        loss = None
        if labels is not None:
            loss = F.nll_loss(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs):
        """No cache: every step reruns the (cheap, windowed) unit on the whole sequence."""
        return {"input_ids": input_ids}


# -- the warm start ---------------------------------------------------------------------------


@torch.no_grad()
def assign_features(model: SAFFUForCausalLM, corpus: TokenDocuments) -> None:
    """Bit-cipher codes by the corpus's token frequencies (one-hot features need nothing). Both
    arms of an experiment call it: the features are data statistics, not trained weights."""
    config = model.config
    if config.embedding != "bitcipher":
        return
    counts = torch.zeros(config.vocab_size)
    for doc in corpus.documents:
        counts += torch.bincount(torch.tensor(doc), minlength=config.vocab_size)
    ranks = torch.empty(config.vocab_size, dtype=torch.long)
    ranks[torch.argsort(-counts, stable=True)] = torch.arange(config.vocab_size)
    model.embedding.copy_(bit_cipher(ranks, config.embedding_bits))


@torch.no_grad()
def solve(model: SAFFUForCausalLM, corpus: TokenDocuments) -> None:
    """The warm start: count on `corpus` and set every weight to its explicit solution.

    Bit-cipher codes are assigned by the corpus's token frequencies first; then W_A from the
    co-occurrence of window features and "position holds the next token", then W_F from the
    co-occurrence of [h, x] (with the solved W_A) and the next token. Two counting passes.
    """
    config = model.config
    check_vocabulary(config, corpus, "solve")
    check_context(config, corpus)
    K, b = config.context_radius, config.feature_size
    assign_features(model, corpus)
    pieces = [torch.tensor(doc) for doc in corpus.documents if len(doc) > 1]
    phi_attention = torch.zeros(K * b, K, dtype=torch.float64)
    for ids in pieces:
        windows, _ = model.window(ids[None, :-1])
        # (T, K): window positions holding the next token (−1 before the start matches none)
        match = _lagged(ids[None, :-1, None], K, -1)[0, :, :, 0] == ids[1:, None]
        found = match.any(-1)
        target = match[found].double() / match[found].sum(-1, keepdim=True)
        phi_attention += windows[0, found].flatten(1).double().T @ target
    model.attention.copy_(explicit_softmax_solution(phi_attention, K, config.eps))

    phi_ff = torch.zeros((K + 1) * b, config.vocab_size, dtype=torch.float64)
    for ids in pieces:
        features = model.features(ids[None, :-1])[0]  # (T, (K+1)·b)
        phi_ff.index_add_(1, ids[1:], features.double().T)
    # Mass of [h, x]: 1 + K when the window is full (the earlier positions of a document have
    # less; the geometric-mean scale uses the full window, ours).
    model.feed_forward.copy_(explicit_softmax_solution(phi_ff, K + 1, config.eps))
    config.vocab_fingerprint = corpus.fingerprint


# SAFFU is not a ZooConfig backbone (its layers are solved, not only trained): its own classes,
# registered when this module is imported (`import zoo` does).
AutoConfig.register(SAFFUConfig.model_type, SAFFUConfig, exist_ok=True)
AutoModelForCausalLM.register(SAFFUConfig, SAFFUForCausalLM, exist_ok=True)
