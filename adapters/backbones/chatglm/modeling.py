"""ChatGLM-6B (first generation) as a transformers 5 model, loading the official checkpoint without remote code.

Implements `THUDM/chatglm-6b` (code revision of 2023-04-27, weights v1.1) from the spec
(`specs/chatglm-6b-ptuning-v2.md` §2): fused per-head QKV, 2-D rotary positions, the GLM prefix-LM mask,
the layer-scaled fp32 softmax, the alpha-scaled residual on the *normalised* input (DeepNorm, alpha =
sqrt(2·28) at every depth, as the official `get_layer` never passes the depth), a tanh-GELU MLP and an output head tied to the word embeddings. Module and parameter
names reproduce the released keys, so `from_pretrained(folder)` reads the 8 `.bin` shards (transformers 5
loads them with `torch.load(weights_only=True)`) or safetensors.

Activations are batch-first (`[b, s, h]`) and the KV cache is a transformers `DynamicCache` with keys
stored after rotary; the official code is sequence-first with tuple caches, which changes layout only.

P-Tuning v2 hook (spec §5.2-5.3): when `model.transformer.prefix_encoder` is set (by the ptuning-v2
method), a forward with an empty cache calls `prefix_encoder(batch_size, dtype=activation dtype)` for
per-layer prefix keys and values `[layers, 2, b, heads, P, head_dim]` and uses them as leading cached
keys/values: no rotary on them, visible to every query, positions not shifted. The encoder owns the
official cast-then-dropout(0.1) step (`adapters/methods/prefix_encoder.py`), so the model adds no dropout.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmadapter.adapters.backbones.chatglm.chat import chat as chat_turn
from mmadapter.adapters.backbones.chatglm.chat import stream_chat as stream_chat_turn
from mmadapter.adapters.backbones.chatglm.configuration import ChatGLMConfig
from mmadapter.adapters.backbones.chatglm.masks import glm_blocked_mask, glm_position_ids

#: Score written into blocked positions before the ×(layer+1) rescale (official value, finite on purpose).
MASKED_SCORE = -10000.0


def rotary_inverse_frequencies(rotary_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """`1 / 10000^(2j/d)`, rounded to fp16 like the official buffer (which is stored in half precision)."""
    exponent = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    return (1.0 / 10000**exponent).half()


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[b, 2, s, rotary_dim]` for both position channels.

    fp16 models compute angles and tables in fp16 as the reference does; others in fp32 (for bf16 the
    reference would round positions above 256 in bf16, which is not reproduced), then cast to `dtype`.
    """
    table_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    inv_freq = rotary_inverse_frequencies(rotary_dim, position_ids.device).to(table_dtype)
    angles = position_ids.to(table_dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_2d_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[b, s, heads, d]`: first half of d by position ids, second half by block position ids."""
    halves = x.chunk(2, dim=-1)
    rotated = [
        half * cos[:, channel, :, None, :] + rotate_half(half) * sin[:, channel, :, None, :]
        for channel, half in enumerate(halves)
    ]
    return torch.cat(rotated, dim=-1)


def glm_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official arithmetic: q/(sqrt(d)·(i+1)), scores in the activation dtype, blocked -> -10000, then
    ×(i+1) and softmax in fp32. `attention_mask`: bool, True = may attend (transformers' convention).
    Returns `([b, s, heads, d], probs)` like transformers' attention functions."""
    coeff = float(module.layer_idx + 1)
    scores = torch.matmul(query / (math.sqrt(query.shape[-1]) * coeff), key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, MASKED_SCORE)
    probs = torch.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class ChatGLMAttention(nn.Module):
    """Self-attention with the fused per-head QKV layout `[head][q|k|v][dim]`.

    The kernel comes from transformers' AttentionInterface: "eager" is the official layer-scaled softmax
    (`glm_eager_attention`); "sdpa" is torch's fused kernel with the same scale (softmax in fp32 inside).
    """

    is_causal = False  # GLM's context is bidirectional; the mask always says what is visible

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        fused = self.query_key_value(hidden_states).view(batch, seq_len, self.num_heads, 3 * self.head_dim)
        query, key, value = fused.split(self.head_dim, dim=-1)
        query, key = apply_2d_rotary(query, *rotary), apply_2d_rotary(key, *rotary)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if prefix_key is not None:
            key = torch.cat([prefix_key, key], dim=2)
            value = torch.cat([prefix_value, value], dim=2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, glm_eager_attention)
        context, _ = attention(self, query, key, value, allowed, scaling=self.head_dim**-0.5, dropout=0.0)
        return self.dense(context.reshape(batch, seq_len, self.num_heads * self.head_dim))


class GLU(nn.Module):
    """The official MLP (named GLU upstream, but not gated): h -> 4h -> tanh-GELU -> h, with biases."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    """DeepNorm-style block: the residual branch is the *normalised* input, scaled by alpha.

    alpha = sqrt(2·config.residual_alpha_layers), i.e. sqrt(56) whatever the depth: the official
    `GLMBlock(num_layers=28)` default is never overridden by `ChatGLMModel.get_layer`.
    """

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = math.sqrt(2 * config.residual_alpha_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        # Prefix tensors are positional so that even reentrant checkpointing sends their gradients back.
        normed = self.input_layernorm(hidden_states)
        attention = self.attention(normed, rotary, allowed, prefix_key, prefix_value, past_key_values)
        hidden_states = self.alpha * normed + attention
        normed = self.post_attention_layernorm(hidden_states)
        return self.alpha * normed + self.mlp(normed)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config: ChatGLMConfig
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Released shards carry a per-layer `rotary_emb.inv_freq` that the official model ignores (spec §2.4).
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, GLM blocks and final LayerNorm (`transformer.*` keys), plus the optional prefix encoder."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        #: P-Tuning v2: a module called as `prefix_encoder(batch_size, dtype=...)` (set by the ptuning-v2 method).
        self.prefix_encoder: nn.Module | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`attention_mask`: a 2-D padding mask (1 = token, 0 = pad) or the official 4-D bool mask (True = blocked).

        `position_ids` (`[b, 2, s]`) are built from `input_ids` when omitted, except when continuing a cache
        (`generate()` supplies them; see `glm_position_ids`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.layers[0].gradient_checkpointing:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0

        prefix = None
        if cached == 0 and self.prefix_encoder is not None:
            prefix = self.prefix_key_values(batch, inputs_embeds.dtype, inputs_embeds.device)
        prefix_length = prefix.shape[4] if prefix is not None else 0
        allowed = self._allowed_mask(input_ids, attention_mask, batch, seq_len, cached, prefix_length)
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, attention_mask, cached)
        if position_ids.shape != (batch, 2, seq_len):
            raise ValueError(f"position_ids must have shape (batch, 2, seq) = {(batch, 2, seq_len)}")
        rotary = rotary_tables(position_ids, self.config.head_dim // 2, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            prefix_key, prefix_value = (prefix[index, 0], prefix[index, 1]) if prefix is not None else (None, None)
            hidden_states = layer(
                hidden_states,
                prefix_key,
                prefix_value,
                rotary=rotary,
                allowed=allowed,
                past_key_values=past_key_values,
            )
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The prefix encoder's `[layers, 2, b, heads, P, head_dim]` keys/values in the activations' dtype."""
        prefix = self.prefix_encoder(batch_size, dtype=dtype)
        config = self.config
        expected = (config.num_layers, 2, batch_size, config.num_attention_heads)
        if prefix.ndim != 6 or tuple(prefix.shape[:4]) != expected or prefix.shape[5] != config.head_dim:
            raise ValueError(
                f"prefix_encoder({batch_size}) returned shape {tuple(prefix.shape)}; expected "
                f"(layers, 2, batch, heads, pre_seq_len, head_dim) = {(*expected, 'P', config.head_dim)}"
            )
        return prefix.to(device=device, dtype=dtype)

    def _allowed_mask(self, input_ids, attention_mask, batch, seq_len, cached, prefix_length):
        """Bool `[b, 1, s, keys]`, True = may attend, over [prefix | cached tokens | new tokens].

        The official eager arithmetic turns a fully blocked row (a pad query) into a uniform average; other
        kernels would return NaN there, so for them every query may also see its own key (real tokens do).
        """
        blocked = self._blocked_mask(input_ids, attention_mask, batch, seq_len, cached, prefix_length)
        if blocked is None:
            return None
        allowed = ~blocked
        if self.config._attn_implementation != "eager":
            key_len = blocked.shape[-1]
            own = torch.arange(seq_len, device=blocked.device)
            allowed[..., own, own + key_len - seq_len] = True
        return allowed

    def _blocked_mask(self, input_ids, attention_mask, batch, seq_len, cached, prefix_length):
        """The official bool mask (True = blocked) from whatever the caller gave."""
        if attention_mask is not None and attention_mask.ndim == 4:
            blocked = attention_mask.bool()
            missing = prefix_length + cached + seq_len - blocked.shape[-1]
            if missing < 0 or blocked.shape[-2] != seq_len:
                raise ValueError(
                    f"4-D attention_mask has shape {tuple(blocked.shape)}; expected (batch, 1, {seq_len}, "
                    f"{cached + seq_len}) (cached + new tokens; prefix columns are added here)"
                )
            return torch.cat([blocked.new_zeros(*blocked.shape[:-1], missing), blocked], dim=-1)
        if input_ids is None:
            if cached and attention_mask is None:
                return None
            raise ValueError(
                "ChatGLM builds its attention mask from input_ids (it looks for <sop>); with inputs_embeds "
                "pass the official 4-D bool attention_mask and position_ids"
            )
        sop = self.config.bos_token_id
        if attention_mask is None:
            return glm_blocked_mask(input_ids, None, bos_token_id=sop, past_length=cached, prefix_length=prefix_length)
        past_tokens = attention_mask.shape[-1] - seq_len
        cached_prefix = cached - past_tokens if cached else prefix_length
        if past_tokens < 0 or cached_prefix < 0 or (past_tokens and not cached):
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache holds {cached} and "
                f"{seq_len} are new; it must cover cached + new tokens"
            )
        return glm_blocked_mask(
            input_ids, attention_mask, bos_token_id=sop, past_length=past_tokens, prefix_length=cached_prefix
        )

    def _default_position_ids(self, input_ids, attention_mask, cached):
        if cached or input_ids is None:
            raise ValueError(
                "position_ids are required here: ChatGLM's 2-D positions depend on where [gMASK] and <sop> sit "
                "in the whole sequence. generate() computes them; by hand use "
                "mmadapter.adapters.backbones.chatglm.masks.glm_position_ids(full_ids, mask)[..., -new_tokens:]"
            )
        padding_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        return glm_position_ids(input_ids, padding_mask, **special_ids(self.config))


def special_ids(config: ChatGLMConfig) -> dict[str, int]:
    return {
        "bos_token_id": config.bos_token_id,
        "gmask_token_id": config.gmask_token_id,
        "mask_token_id": config.mask_token_id,
    }


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its tied LM head; `generate()`, `chat()` and `stream_chat()` work on it."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Tie the head to the embedding even when the checkpoint stores both (the official files do).

        transformers 5 leaves two stored tensors untied when they differ; the official model (transformers
        4.27) tied them after loading, so the embedding's values win and the file's `lm_head.weight` is unused.
        """
        embedding, head = "transformer.word_embeddings.weight", "lm_head.weight"
        if missing_keys is not None and embedding not in missing_keys and head not in missing_keys:
            if getattr(self.config, "tie_word_embeddings", True) and not torch.equal(
                self.transformer.word_embeddings.weight, self.lm_head.weight
            ):
                warnings.warn(
                    "the checkpoint's lm_head.weight differs from transformer.word_embeddings.weight; ChatGLM-6B "
                    "ties them, so the embedding is used for both (as the official loader did)",
                    stacklevel=2,
                )
            missing_keys = None
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted cross-entropy when `labels` are given, -100 ignored, computed in fp32)."""
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' preparation, with GLM 2-D positions recomputed from the whole sequence each step.

        generate() derives 1-D positions from the mask and increments both channels; neither is right
        for GLM (channel 0 stays at the [gMASK] index while generating), so those are discarded.
        """
        supplied = kwargs.pop("position_ids", None)
        if supplied is not None and supplied.ndim == 3:
            raise ValueError("generate() builds ChatGLM's 2-D position_ids itself; do not pass them")
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if model_inputs.get("input_ids") is None:
            raise ValueError("ChatGLM-6B generation needs input_ids (its mask and positions are built from them)")
        new_tokens = model_inputs["input_ids"].shape[1]
        positions = glm_position_ids(input_ids, attention_mask, **special_ids(self.config))
        model_inputs["position_ids"] = positions[..., -new_tokens:].contiguous()
        return model_inputs

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """One official chat turn; returns `(response, history + [(query, response)])` (see `chat.chat`)."""
        return chat_turn(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        """Like `chat`, yielding `(partial_response, history)` as tokens arrive (see `chat.stream_chat`)."""
        yield from stream_chat_turn(self, tokenizer, query, history, **kwargs)
