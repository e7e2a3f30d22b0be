"""A sequence mixer written outside the zoo, the way a user adds one: this file and one
`zoo.register_mixer` call (the README's "Add a mixer" example, with the padding and FLOP details
a real mixer needs). Importing the module registers it.

The mixer is a gated diagonal linear RNN (an exponential moving average per channel):

    u_t = W_in x_t,   a = σ(θ) per channel,   h_t = a ⊙ h_{t−1} + (1 − a) ⊙ u_t,   y_t = W_out h_t
"""

from __future__ import annotations

import torch
from torch import nn

import zoo
from zoo.cache import recurrent_state
from zoo.flops import linear_flops
from zoo.registry import Setting, positive_int


class ToyEMA(nn.Module):
    def __init__(self, config: zoo.ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.width = config.toy_ema_expand * config.hidden_size
        self.in_proj = nn.Linear(config.hidden_size, self.width, bias=False)
        self.decay_logit = nn.Parameter(torch.zeros(self.width))  # a = 0.5 at the start
        self.out_proj = nn.Linear(self.width, config.hidden_size, bias=False)

    def _scan(self, x, context, state):
        """The recurrence token by token, from `state` (B, W) or zeros; padding is skipped."""
        u = self.in_proj(x)  # (B, T, W)
        a = torch.sigmoid(self.decay_logit).expand_as(u)
        if context.token_mask is not None:  # a padded token neither decays nor feeds the state
            keep = context.token_mask[..., None]
            a, u = torch.where(keep, a, 1.0), u * keep
        h = state if state is not None else u.new_zeros(u.shape[0], self.width)
        outputs = []
        for t in range(u.shape[1]):
            h = a[:, t] * h + (1 - a[:, t]) * u[:, t]
            outputs.append(h)
        return self.out_proj(torch.stack(outputs, dim=1)), h

    def forward(self, hidden_states, context, cache=None):
        state = recurrent_state(cache, self.layer_idx) if cache is not None else None
        y, final = self._scan(hidden_states, context, state)
        if cache is not None:
            cache.update_recurrent_state(final, self.layer_idx)
        return y

    def reference_forward(self, hidden_states, context):
        return self._scan(hidden_states.float(), context, None)[0].to(hidden_states.dtype)

    def state_size(self, batch: int, seq_len: int) -> int:
        return batch * self.width

    def flops_per_token(self, seq_len: int) -> int:
        return linear_flops(self) + 3 * self.width


zoo.register_mixer(
    "toy_ema",
    ToyEMA,
    cache="linear_attention",
    doc="Gated diagonal linear RNN (a test of the registry).",
    settings={"toy_ema_expand": Setting(2, "State width per model channel.", positive_int)},
    per_layer=("toy_ema_expand",),
)
