"""A causal-LM batch split over the sequence for context parallelism (`zoo.parallel.context`).

The next-token labels must be shifted on the whole sequence, not per span: the last token of
rank r's span is scored on the first token of rank r + 1's. And the mean is over every scored
token of every rank: each rank's loss is its sum over its span divided by the global count, so
that the ranks' gradients add up to the one-process gradient.

    with context_parallel(group) as cp:  # every rank holds the whole (B, T) batch
        batch = shard_causal_batch(input_ids, labels, cp)  # spans, shifted labels, global count
        out = model(**batch)
        out.loss.backward()
    # then sum every parameter's gradient over the group

`zoo.modeling.ZooForCausalLM` does the same from the span's own `labels` when it is given those
instead (`shift_labels_over_ranks`, `count_over_ranks`: one small exchange each).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zoo.parallel.context import ContextParallel, shard_sequence

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T) next-token targets: position t is scored on labels[t + 1], the last on nothing."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shard_causal_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    cp: ContextParallel | None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """This rank's span of a whole (B, T) batch, as keyword arguments of the model's forward:
    `input_ids` (B, T/P), and with `labels` (B, T, unshifted, `ignore_index` = not scored) the
    span of the labels shifted over the whole sequence (`shift_labels`) and the number of
    scored tokens of the whole batch (`num_items_in_batch`, a 0-d tensor). Without a group
    (`cp` None) the whole batch, shifted the same way."""
    batch: dict[str, torch.Tensor] = {}
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}"
            )
        shifted = shift_labels(labels, ignore_index)
        batch["num_items_in_batch"] = (shifted != ignore_index).sum()
        batch["shift_labels"] = shifted if cp is None else shard_sequence(shifted, cp).contiguous()
    batch["input_ids"] = input_ids if cp is None else shard_sequence(input_ids, cp).contiguous()
    return batch


def shard_windows(windows: torch.Tensor, cp: ContextParallel | None) -> dict[str, torch.Tensor]:
    """(B, T + 1) training windows (T inputs and the token after each) as keyword arguments of
    the model's forward: the first T tokens as `input_ids`, the last T as `shift_labels` (and as
    `labels`: a transformers model computes its loss only when given labels, and its loss then
    takes the shift_labels as they are), B·T as `num_items_in_batch`; under context parallelism
    (`cp`) this rank's span of both. The window's last token is only a target: no forward runs
    on it (its router scores would enter a MoE model's router losses otherwise)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if cp is not None:
        inputs, targets = shard_sequence(inputs, cp), shard_sequence(targets, cp)
    return {
        "input_ids": inputs.contiguous(),
        "shift_labels": targets.contiguous(),
        "labels": targets.contiguous(),
        "num_items_in_batch": torch.tensor(windows[:, 1:].numel(), device=windows.device),
    }


def shift_labels_over_ranks(
    labels: torch.Tensor, cp: ContextParallel, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The span's (B, L) labels shifted over the whole sequence: each span's last target is the
    next rank's first label (`ignore_index` on the last rank). One all-gather of B labels."""
    first = labels[:, :1].contiguous()
    firsts = [torch.empty_like(first) for _ in range(cp.size)]
    dist.all_gather(firsts, first, group=cp.group)
    after = firsts[cp.rank + 1] if cp.rank + 1 < cp.size else torch.full_like(first, ignore_index)
    return torch.cat([labels[:, 1:], after], dim=1)


def count_over_ranks(
    shift_labels: torch.Tensor, cp: ContextParallel, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Scored tokens over every rank's span (a 0-d tensor, the same on every rank): the
    denominator of the loss of the whole sequence. One all-reduce."""
    count = (shift_labels != ignore_index).sum().reshape(1)
    dist.all_reduce(count, group=cp.group)
    return count[0]
