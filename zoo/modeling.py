"""One backbone for every family: blocks of pre-norm sequence mixer + pre-norm channel mixer.

    h = h + mixer(norm(h), context, cache)
    h = h + channel_mixer(norm(h))            (skipped where the layer's channel mixer is "none")

A MoE channel mixer also returns its router logits; the block passes them up (returned, not
stashed on the module, so gradient checkpointing, reentrant too, keeps their gradient) and the
causal LM adds the load-balancing and z-losses to its loss.

Families are presets of `ZooConfig` and differ only in the mixers they stack; the classes at the
end of this file only bind a preset's config class, so that the Auto classes can find them.

Context parallelism (`zoo.parallel.context`): inside `with context_parallel(group):` the model is
called on its rank's span (B, T/P) of the sequence. Per-token layers need nothing; the context
carries the group and the span's offset (positions are global) and every sequence mixer brings
in what earlier spans contribute. The causal LM loss and the router losses are those of the
whole sequence (see `ZooForCausalLM.forward`). No cache and no padding there: it trains only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CompileConfig,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.utils.deprecation import deprecate_kwarg

from zoo import registry
from zoo.cache import (
    has_static_attention,
    new_cache,
    recurrent_only,
    static_masks,
    static_step_masks,
)
from zoo.checkpoint import CheckpointError, check_checkpoint_dir, check_weights_fit
from zoo.configuration import (
    CosFormer2Config,
    GatedDeltaNetConfig,
    GLAConfig,
    HGRN2Config,
    HybridConfig,
    HyenaConfig,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    TNLConfig,
    ZooConfig,
)
from zoo.layers import build_channel_mixer, build_sequence_mixer
from zoo.layers.context import MixerContext
from zoo.layers.moe import Experts, Router, router_losses
from zoo.layers.norm import build_norm
from zoo.parallel.batch import count_over_ranks, shift_labels_over_ranks
from zoo.parallel.context import ContextParallel, current
from zoo.parallel.expert import sum_over_ranks
from zoo.remote import write_remote_code

logger = logging.getLogger(__name__)


class ZooBlock(GradientCheckpointingLayer):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.mixer_norm = build_norm(config.norm_type, config.hidden_size, eps)
        self.mixer = build_sequence_mixer(config, layer_idx)
        self.channel_mixer = build_channel_mixer(config, layer_idx)
        self.routed = registry.channel_mixer(config.channel_mixers[layer_idx]).routed
        self.channel_norm = (
            build_norm(config.norm_type, config.hidden_size, eps)
            if self.channel_mixer is not None
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, router logits [B·T, E] of a MoE channel mixer, else None)."""
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), context, cache)
        router_logits = None
        if self.routed:
            out, router_logits = self.channel_mixer(
                self.channel_norm(hidden_states), context.token_mask
            )
            hidden_states = hidden_states + out
        elif self.channel_mixer is not None:
            hidden_states = hidden_states + self.channel_mixer(self.channel_norm(hidden_states))
        return hidden_states, router_logits


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZooBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after checking a local folder.

        A missing, truncated or corrupt file, a foreign `model_type`, or weights that do not fit
        the config (missing, unexpected, another shape) raise `zoo.checkpoint.CheckpointError`
        naming the file and the key, before transformers loads anything.
        """
        path = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        if path.is_dir():
            stored = check_checkpoint_dir(path)
        if path.is_dir() and issubclass(cls, ZooForCausalLM):
            config = kwargs.get("config")
            if not isinstance(config, ZooConfig):
                config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            tied = model.get_expanded_tied_weights_keys(all_submodels=True)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
            check_weights_fit(stored, expected, path / "config.json", tied)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` plus the remote-code shim (see `zoo.remote`).

        A `state_dict` passed in (accelerate's `get_state_dict` of an FSDP model: every tensor a
        fresh copy) loses the weights the model ties, which transformers could no longer tell
        from the storage they share, so the folder holds each weight once either way."""
        if kwargs.get("state_dict") is not None:
            tied = self.get_expanded_tied_weights_keys(all_submodels=True)
            kwargs["state_dict"] = {k: v for k, v in kwargs["state_dict"].items() if k not in tied}
        write_remote_code(self.config, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' default init (N(0, initializer_range) for Linear/Embedding, norms at 1),
        then a mixer's own `init_zoo_weights()` where its paper prescribes one (Mamba's A, D and
        Δ bias). transformers visits children before parents, so the mixer's init wins; it uses
        `transformers.initialization`, which leaves weights loaded from a checkpoint untouched.
        """
        super()._init_weights(module)
        if isinstance(module, (Router, Experts)):  # stacked weights, not nn.Linear
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=self.config.initializer_range)
        if hasattr(module, "init_zoo_weights"):
            module.init_zoo_weights()
        if isinstance(module, ZooModel):
            for name, spec in module.mixer_parameter_specs().items():
                spec.init(getattr(module, name))

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        """transformers' tied keys (the LM head on the embedding), plus the weights layers share
        (`mixer_weight_source`, `channel_mixer_weight_source`): `tie_weights` makes every such
        target the same Parameter as its source, and saving writes it once."""
        tied = super().get_expanded_tied_weights_keys(all_submodels)
        if not all_submodels and isinstance(self, ZooModel):
            tied.update(self.shared_weight_keys())
        return tied

    def num_parameters(
        self, only_trainable: bool = False, exclude_embeddings: bool = False, active: bool = False
    ) -> int:
        """transformers' count; `active=True` counts only what one token runs: k of the E routed
        experts of every MoE layer (Abnar et al.'s N_a: always-on parameters included)."""
        total = super().num_parameters(only_trainable, exclude_embeddings)  # shared ones once
        if not active:
            return total
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, Experts):
                inactive = 1 - self.config.num_experts_per_tok / module.num_experts
                for param in module.parameters():
                    if id(param) not in seen and (param.requires_grad or not only_trainable):
                        seen.add(id(param))
                        total -= round(param.numel() * inactive)
        return total

    def state_size(self, batch: int = 1, seq_len: int = 1) -> int:
        """Elements of the inference cache after `seq_len` tokens, summed over layers."""
        return sum(block.mixer.state_size(batch, seq_len) for block in self.base_model.layers)


class ZooModel(ZooPreTrainedModel):
    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ZooBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        # Parameters a mixer needs the model to hold for all its layers (HGRN2's lower bounds Γ,
        # shared through a softmax over depth), under the names its registry entry gives them.
        for name, spec in self.mixer_parameter_specs().items():
            self.register_parameter(name, nn.Parameter(torch.zeros(spec.shape(config))))
        self.gradient_checkpointing = False
        # transformers reads this when saving: the targets are written once, as their source.
        self._tied_weights_keys = self.shared_weight_keys()
        self.post_init()

    def mixer_parameter_specs(self) -> dict[str, registry.ModelParameter]:
        """The model-held parameters of the mixers this model stacks, by name."""
        specs: dict[str, registry.ModelParameter] = {}
        for name in dict.fromkeys(self.config.mixers):
            specs.update(registry.sequence_mixer(name).model_parameters)
        return specs

    def shared_weight_keys(self) -> dict[str, str]:
        """{target: source} parameter names of the weights layers share with earlier layers."""
        config = self.config
        keys: dict[str, str] = {}
        for part in ("mixer", "channel_mixer"):
            for i, j in enumerate(getattr(config, f"{part}_weight_source") or []):
                if j is None:
                    continue
                for name, _ in getattr(self.layers[j], part).named_parameters():
                    keys[f"layers.{i}.{part}.{name}"] = f"layers.{j}.{part}.{name}"
        return keys

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embedding_multiplier != 1.0:
                inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        cp = current()
        if cp is not None:
            if cache is not None or use_cache:
                raise ValueError(
                    "context parallelism splits one sequence for training and runs without a "
                    "cache; decode outside context_parallel (use_cache=False here)"
                )
            use_cache = False
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = new_cache(self.config)
        output_hidden_states = (
            self.config.output_hidden_states
            if output_hidden_states is None
            else output_hidden_states
        )

        batch, seq_len, _ = inputs_embeds.shape
        past_len = 0
        # Absolute positions only matter to softmax attention, whose cache layers know the length
        # (cosFormer2's LRPE uses only differences within a call; its state is origin-relative).
        # A static cache's length is a 0-d tensor, so that a compiled step never reads it.
        if cache is not None and position_ids is None and not all(cache.is_linear):
            past_len = cache.get_seq_length()
        if has_static_attention(cache) and not isinstance(attention_mask, Mapping):
            # Made before any layer writes the cache: the mask covers its slots as they are now.
            attention_mask = static_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids
            )
        context = MixerContext.build(
            attention_mask, position_ids, batch, seq_len, past_len, inputs_embeds.device, cp
        )
        context.parameters = {name: getattr(self, name) for name in self.mixer_parameter_specs()}
        if self.gradient_checkpointing and self.training and self.config.kv_source:
            checkpoint = getattr(self, "_gradient_checkpointing_func", None)
            if getattr(checkpoint, "keywords", {}).get("use_reentrant", True):
                raise ValueError(
                    "reentrant activation checkpointing runs blocks without grad and would drop "
                    "the gradient of K/V that later layers read (kv_source); enable it with "
                    "{'use_reentrant': False}"
                )

        hidden_states = inputs_embeds
        all_hidden_states = []
        router_logits = []
        for block in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, logits = block(hidden_states, context, cache=cache)
            if logits is not None:
                router_logits.append(logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        outputs = {
            "last_hidden_state": hidden_states,
            "cache": cache,
            "hidden_states": tuple(all_hidden_states) if output_hidden_states else None,
        }
        if self.config.has_moe:
            return MoeModelOutputWithPast(**outputs, router_logits=tuple(router_logits))
        return BaseModelOutputWithPast(**outputs)


def _last_columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` columns of a generation step's (B, L) tensor (tokens, positions, 2-D mask) as
    a contiguous copy: a compiled step is built for its layout, and a (B, n) view of (B, L) may be
    dense yet keep the stride L, which `clone()` alone would keep (and `torch.compile` would
    recompile the step for every token)."""
    return x[..., -n:].clone(memory_format=torch.contiguous_format)


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    router_loss_group: Any = None
    """The process group whose ranks share one global batch, over which a MoE model's router
    losses are taken (`zoo.layers.moe.router_losses`); None: this process's tokens alone, or
    under context parallelism the context-parallel group. A trainer sets it on the instance."""

    # generate() asks for the masks of a compilable (static) cache here, per layer type.
    create_masks_for_generate = staticmethod(static_masks)

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | MoeCausalLMOutputWithPast:
        """Next-token logits; with `labels` (same shape as input_ids, -100 = ignore), the loss.

        Labels are shifted inside, as in transformers: position t is scored on token t + 1.
        Already shifted targets may come as `shift_labels=` instead, and `num_items_in_batch=`
        makes the loss a sum over tokens divided by that count (transformers' loss arguments).

        Under context parallelism (`zoo.parallel.context.context_parallel`; input_ids are this
        rank's span): `labels` are the span's own, and the last one is scored on the next rank's
        first label (one exchange), or `shift_labels` and `num_items_in_batch` come from
        `zoo.parallel.batch.shard_causal_batch`. The mean is over every scored token of every
        rank (the count is all-reduced unless given). The returned `loss` is the whole
        sequence's on every rank, the same value as one process, and its backward is this
        rank's share (its tokens' terms, `zoo.parallel.expert.sum_over_ranks`): summing each
        parameter's gradient over the group gives the one-process gradient, and the loss is
        logged as it is, not summed again over the group.

        A model with MoE layers returns `MoeCausalLMOutputWithPast`: with labels, its loss
        includes `router_aux_loss_coef` × the load-balancing loss (`aux_loss`) and
        `router_z_loss_coef` × the router z-loss, whatever `output_router_logits` says (unlike
        Mixtral, whose loss leaves them out unless it returns router logits, an easy way to
        train a collapsed router); `output_router_logits` only decides whether the per-layer
        logits are returned.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        cp = current()
        loss = None
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is not None or shift_labels is not None:
            loss = self._lm_loss(logits, labels, shift_labels, cp, kwargs)
        if not self.config.has_moe:
            return CausalLMOutputWithPast(
                loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
            )

        output_router_logits = (
            self.config.output_router_logits
            if output_router_logits is None
            else output_router_logits
        )
        aux_loss = None
        if loss is not None or output_router_logits:
            token_mask = attention_mask
            if isinstance(token_mask, Mapping):  # a static cache's masks: the current tokens'
                token_mask = token_mask.get("linear_attention")
            if token_mask is not None:  # the current tokens' columns
                token_mask = token_mask[:, -outputs.last_hidden_state.shape[1] :].bool()
            group = self.router_loss_group
            if group is None and cp is not None:
                group = cp.group
            aux_loss, router_loss = router_losses(
                outputs.router_logits, self.config, token_mask, group
            )
            if loss is not None:
                loss = loss + router_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate`; with `cache_implementation="static"` the zoo's fast decode
        path (`zoo.decode`): a static cache, a compiled per-token step on every device, and on a
        CPU matrix products compiled for it (`zoo.decode.decode_linears`). Greedy tokens are the
        ones the default (dynamic-cache, eager) path gives."""
        from zoo.decode import fast_path

        kwargs, products = fast_path(self, kwargs)
        with products:
            return super().generate(*args, **kwargs)

    def get_compiled_call(self, compile_config: CompileConfig | None) -> Any:
        """The decode step `generate` calls over a static cache: transformers' `torch.compile` of
        the model, or with `zoo.decode.ahead_of_time_config()` an AOTInductor-compiled one."""
        from zoo.decode import AheadOfTimeConfig, AheadOfTimeStep
        from zoo.decode import compile_config as default_config

        if not isinstance(compile_config, AheadOfTimeConfig):
            return super().get_compiled_call(compile_config)
        if self.device.type != "cpu":
            raise ValueError(
                "compile_config=ahead_of_time_config() is for CPUs, the model is on "
                f"{self.device}; leave compile_config unset there (CUDA graphs, transformers' "
                "default)"
            )
        return AheadOfTimeStep(
            self, lambda: super(ZooForCausalLM, self).get_compiled_call(default_config(self.device))
        )

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        """transformers' greedy search and sampling; over a static cache on a CPU, the zoo's leaner
        loop with the same results (`zoo.decode.decode_loop`)."""
        from zoo.decode import decode_loop, runs_decode_loop

        if runs_decode_loop(
            self, generation_config, stopping_criteria, synced_gpus, model_kwargs
        ):  # fmt: skip
            return decode_loop(
                self,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                streamer,
                model_kwargs,
            )
        return super()._sample(
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )

    # What a decode step over a static cache may be asked for besides the token: anything else
    # goes through transformers' general `prepare_inputs_for_generation` (and its loop,
    # `zoo.decode.runs_decode_loop`).
    _DECODE_STEP_KEYS = frozenset({"attention_mask", "position_ids", "logits_to_keep", "use_cache"})

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """transformers' inputs of one generation step; over an all-recurrent cache the 2-D mask is
        cut to the current tokens (the only padding a recurrent layer reads), so a decode step
        keeps one shape instead of a mask that grows by a column per token. A decode step over a
        static cache (one new token, nothing but the usual inputs) is built directly, with the
        same keys, order and values as the general path (`tests/test_decode.py`), in half its
        Python time (a few percent of a compiled CPU step)."""
        cache = kwargs.get("cache")
        if (
            not args
            and kwargs.get("next_sequence_length") == 1
            and not kwargs.get("is_first_iteration")
            and getattr(cache, "is_compileable", False)
            and kwargs.get("inputs_embeds") is None
            and input_ids.device == self.device
            and set(kwargs) - {"next_sequence_length", "cache", "inputs_embeds"}
            <= self._DECODE_STEP_KEYS
        ):
            return self._decode_step_inputs(input_ids, **kwargs)
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache, mask = inputs.get("cache"), inputs.get("attention_mask")
        tokens = inputs.get("input_ids")
        tokens = inputs.get("inputs_embeds") if tokens is None else tokens
        if cache is not None and recurrent_only(cache) and isinstance(mask, torch.Tensor):
            inputs["attention_mask"] = _last_columns(mask, tokens.shape[1])
        return inputs

    def _decode_step_inputs(
        self,
        input_ids: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one decode step over a static cache: the last token and its position
        (contiguous copies: a compiled step is built for their layout), the masks, and the
        remaining options passed on."""
        inputs: dict[str, Any] = {"input_ids": _last_columns(input_ids, 1), "cache": cache}
        if position_ids is not None:
            inputs["position_ids"] = _last_columns(position_ids, 1)
        if recurrent_only(cache):
            mask = None if attention_mask is None else _last_columns(attention_mask, 1)
        else:
            mask = static_step_masks(cache, input_ids, attention_mask)
        if mask is not None:
            inputs["attention_mask"] = mask
        for key in ("logits_to_keep", "use_cache"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: Any,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        """transformers' update after a generation step (the cache passed on, the 2-D mask and
        the positions grown by the new tokens), the same values in half the tensor operations."""
        mask = model_kwargs.pop("attention_mask", None)
        positions = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )
        if mask is not None:
            model_kwargs["attention_mask"] = nn.functional.pad(mask, (0, num_new_tokens), value=1)
        if positions is not None:
            step = (
                1
                if num_new_tokens == 1
                else torch.arange(1, num_new_tokens + 1, device=positions.device)
            )
            model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + step], -1)
        return model_kwargs

    def _lm_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        cp: ContextParallel | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The causal LM loss (see `forward`), through transformers' `loss_function`."""
        vocab_size = self.config.vocab_size
        if shift_labels is not None:  # transformers' loss views it flat
            shift_labels = shift_labels.contiguous()
        if cp is None:
            return self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=vocab_size,
                shift_labels=shift_labels,
                **kwargs,
            )
        ignore_index = kwargs.get("ignore_index", -100)
        if shift_labels is None:
            shift_labels = shift_labels_over_ranks(labels, cp, ignore_index)
        if kwargs.get("num_items_in_batch") is None:
            kwargs["num_items_in_batch"] = count_over_ranks(shift_labels, cp, ignore_index)
        share = self.loss_function(
            logits=logits, labels=None, vocab_size=vocab_size, shift_labels=shift_labels, **kwargs
        )
        return sum_over_ranks(share, cp.group)


_FAMILY_CLASSES: dict[type[ZooConfig], tuple[type[ZooModel], type[ZooForCausalLM]]] = {}


def causal_lm_classes(config_class: type[ZooConfig]) -> tuple[type[ZooModel], type[ZooForCausalLM]]:
    """The base model and causal LM classes of a family preset, named after it (`TNLConfig` ->
    `TNLModel`, `TNLForCausalLM`), made once: they only bind the config class, so that
    transformers' Auto classes and `trust_remote_code` can find them."""
    if config_class not in _FAMILY_CLASSES:
        stem = config_class.__name__.removesuffix("Config")
        module = __name__ if config_class.__module__ == ZooConfig.__module__ else None
        made = []
        for base, suffix in ((ZooModel, "Model"), (ZooForCausalLM, "ForCausalLM")):
            cls = type(f"{stem}{suffix}", (base,), {"config_class": config_class})
            cls.__module__ = module or config_class.__module__
            made.append(cls)
        _FAMILY_CLASSES[config_class] = (made[0], made[1])
    return _FAMILY_CLASSES[config_class]


LlamaModel, LlamaForCausalLM = causal_lm_classes(LlamaConfig)
TNLModel, TNLForCausalLM = causal_lm_classes(TNLConfig)
HGRN2Model, HGRN2ForCausalLM = causal_lm_classes(HGRN2Config)
GLAModel, GLAForCausalLM = causal_lm_classes(GLAConfig)
Mamba2Model, Mamba2ForCausalLM = causal_lm_classes(Mamba2Config)
GatedDeltaNetModel, GatedDeltaNetForCausalLM = causal_lm_classes(GatedDeltaNetConfig)
CosFormer2Model, CosFormer2ForCausalLM = causal_lm_classes(CosFormer2Config)
MambaModel, MambaForCausalLM = causal_lm_classes(MambaConfig)
HyenaModel, HyenaForCausalLM = causal_lm_classes(HyenaConfig)
HybridModel, HybridForCausalLM = causal_lm_classes(HybridConfig)


def register_auto(family: registry.Family) -> None:
    """Register a family's config and model classes with transformers' Auto classes."""
    config = family.config_class()
    model, lm = causal_lm_classes(config)
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, model, exist_ok=True)
    AutoModelForCausalLM.register(config, lm, exist_ok=True)


def register_family(name: str, config: type[ZooConfig], **entry: Any) -> registry.Family:
    """Register a family (`zoo.registry.register_family`), make its model classes and register
    them with transformers' Auto classes, so `AutoModelForCausalLM.from_config` builds it."""
    family = registry.register_family(name, config, **entry)
    register_auto(family)
    return family


# Importing this module (as `import zoo` does) makes every registered family loadable through
# transformers' Auto classes.
for _family in registry.families().values():
    register_auto(_family)


def _looks_like_a_path(name: str) -> bool:
    """Whether `name` can only be a local path (a Hub id is `name` or `org/name`)."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix in (".json", ".safetensors")
    )


def load_pretrained(name_or_path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """A zoo model (any family, or SAFFU) from a checkpoint folder or Hub id, for the tools that
    take a user's path (`zoo eval`, `zoo generate`, the lm-eval adapter). A path that does not
    exist, a folder that is not a zoo checkpoint (another library's `model_type`, unreadable
    config.json, missing or corrupt weights, weights that do not fit the config) raise one-line
    errors naming the file, where the Auto classes would load another library's model."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        check_checkpoint_dir(path)
    elif path.exists() or _looks_like_a_path(name):
        raise FileNotFoundError(f"{name}: no such checkpoint folder")
    config = AutoConfig.from_pretrained(name)
    if not str(getattr(config, "model_type", "")).startswith("zoo"):
        raise CheckpointError(
            f"{name}: model_type={config.model_type!r} is not a hybrid-zoo model (zoo_*)"
        )
    return AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
