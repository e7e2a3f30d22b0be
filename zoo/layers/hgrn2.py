"""HGRN2's sequence mixer: a gated linear RNN with outer-product state expansion.

"HGRN2: Gated Linear RNNs with State Expansion" (Qin et al., arXiv 2404.07904), sized as in the
linear-complexity scaling-law paper (Shen et al., arXiv 2406.16690, App. A.1.3). Per head of
forget/query dim e = `hgrn2_expand_ratio` (H = d / e heads), with this layer's lower bound β_l:

    f_t = β_l + (1 − β_l) σ(x W_f),  k_t = 1 − f_t,  q_t = SiLU(x W_q),  i_t = x W_i
    H_t = Diag(f_t) H_{t−1} + k_t i_tᵀ  (e × e),   y_t = q_tᵀ H_t
    out = W_o Norm(concat_h y)                                          (no output gate)

The recurrence is gated linear attention with q, k = 1 − f, v = i and log decay log f, run by
`zoo.kernels.gla`. β_l = `hgrn2_lower_bounds(Γ)[layer_idx]` comes from Γ (L, d), a parameter
the model holds for all HGRN2 layers (declared in HGRN2's registry entry, passed as
`context.parameters["hgrn2_lower_bounds"]`; softmax over depth, cumsum, minus the first row), so
β_0 = 0 and deeper layers forget less. A context without Γ (a mixer used outside the model)
means β = 0.

Choices where the sources differ (shared/papers/linear-families.md §2): q = SiLU and i = identity
(fla `fla/layers/hgrn2.py` and the first author's LM code; the LRA code uses sigmoid/SiLU); the
value dim per head is e too (fla's head_i_dim = d / H), so the state is e × e per head and d·e per
layer; no short convolution (off by default in fla). log f is formed as fla does,
logaddexp(log β, log(1 − β) + logsigmoid(x W_f)), which stays finite for any logit; where fla skips
layer 0 (whose β_0 is 0 anyway), we take log β = −inf where β = 0 exactly, with a gradient that
stays finite.

By default the output norm is `config.norm_type` over the full width with `config.rms_norm_eps`
(SRMSNorm for the preset, as in the author's code) and q is not scaled: a scale of q only scales
y, which that norm undoes up to its eps. fla's HGRN2 (`zoo.convert.fla_hgrn2`) differs in both,
and three settings express it:

    hgrn2_q_scale = "rsqrt_dim"   q · e^(−1/2) before the recurrence (fla's gla ops' default
                                  scale); applied before the op, it holds for every form: chunked,
                                  recurrent decode, naive, each kernel backend, context parallel
    hgrn2_output_norm = "rmsnorm" the output norm with gain ("srmsnorm": without), whatever
                                  `norm_type` says ("config", the default, follows it)
    hgrn2_output_norm_eps = 1e-5  its epsilon (None, the default, is `rms_norm_eps`); fla uses
                                  1e-5 there whatever its `norm_eps`

Padding never enters the state: at padded tokens log f = 0 (no decay) and i = 0, so a left-padded
row decodes exactly like the same row unpadded.

Under context parallelism (`zoo.parallel.scan.recurrent_group`; never with a cache) each rank runs
its span with `zoo.parallel.scan.gla_cp`: the op from a zero state, one all-gather of the spans'
final states and total decays Σ_t log f_t, and the carried state read out into this span's outputs;
exact in forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.gla import gla_naive
from zoo.layers.context import MixerContext
from zoo.layers.gla import gated_recurrence
from zoo.layers.norm import build_norm


def hgrn2_lower_bounds(gamma: torch.Tensor) -> torch.Tensor:
    """β (L, d) from Γ (L, d): β_l = Σ_{j≤l} softmax(Γ, over layers)_j − softmax(Γ)_0.

    β_0 = 0 and β rises with depth, below 1; with Γ = 0 (the init) β_l = l / L.
    """
    probs = gamma.float().softmax(dim=0)
    return probs.cumsum(dim=0) - probs[0]


def _log_lower_bound(beta: torch.Tensor) -> torch.Tensor:
    """log β with log 0 = −inf and a finite (zero) gradient there, where a plain log gives NaN."""
    tiny = torch.finfo(beta.dtype).tiny
    return beta.clamp(min=tiny).log().masked_fill(beta <= 0, -torch.inf)


class HGRN2Attention(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.hgrn2_expand_ratio
        self.num_heads = config.hidden_size // self.head_dim
        self.chunk_size = config.hgrn2_chunk_size
        self.backend = config.kernel_backend
        # 1.0 keeps q as it is (no multiply: the default path stays bit for bit what it was).
        self.q_scale = self.head_dim**-0.5 if config.hgrn2_q_scale == "rsqrt_dim" else 1.0
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.f_proj = nn.Linear(d, d, bias=False)
        self.i_proj = nn.Linear(d, d, bias=False)
        norm_type = config.hgrn2_output_norm
        eps = config.hgrn2_output_norm_eps
        self.norm = build_norm(
            config.norm_type if norm_type == "config" else norm_type,
            d,
            config.rms_norm_eps if eps is None else eps,
        )
        self.o_proj = nn.Linear(d, d, bias=False)

    def _gates(
        self, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, i and log f of the recurrence, each (B, T, H, e); k and log f in fp32."""
        batch, seq_len, _ = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)  # (B, T, H, e)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        i = self.i_proj(x).view(shape)  # (B, T, H, e)
        log_f = F.logsigmoid(self.f_proj(x).float()).view(shape)  # (B, T, H, e)
        gamma = context.parameters.get("hgrn2_lower_bounds")  # (L, d)
        if gamma is not None:
            beta = hgrn2_lower_bounds(gamma)[self.layer_idx]  # (d,)
            beta = beta.view(self.num_heads, -1)  # (H, e)
            log_f = torch.logaddexp(_log_lower_bound(beta), torch.log1p(-beta) + log_f)
        if context.token_mask is not None:
            pad = ~context.token_mask[:, :, None, None]  # (B, T, 1, 1)
            log_f = log_f.masked_fill(pad, 0.0)
            i = i.masked_fill(pad, 0.0)
        k = -torch.expm1(log_f)  # 1 − f, exact near f = 1; 0 at padded tokens
        return q, k, i, log_f

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.norm(y.reshape(x.shape)))

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        q, k, i, log_f = self._gates(hidden_states, context)
        y = gated_recurrence(
            q, k, i, log_f, context, cache, self.layer_idx, self.chunk_size, self.backend
        )
        return self._output(y, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: the token-by-token recurrence in fp32."""
        q, k, i, log_f = self._gates(hidden_states, context)
        y, _ = gla_naive(q, k, i, log_f)
        return self._output(y, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, then per head the gated state update and the read-out: 4 · d · e."""
        return linear_flops(self) + 4 * self.num_heads * self.head_dim * self.head_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: one e × e state per head (d · e per layer), whatever the length."""
        return batch * self.num_heads * self.head_dim * self.head_dim
