"""Llama-family decoder (Llama 2/3, Mistral; Qwen2 and Qwen3 through config flags).

Parameter names mirror Hugging Face checkpoints; ``qkv_proj`` and ``gate_up_proj``
are fused and filled by the loader through ``packed_modules_mapping``.

Parallelism comes from the process's :class:`~rtllm.distributed.Mapping`
(:func:`rtllm.distributed.parallel_state.get_mapping`): with ``tp_size > 1`` the
layers are the tensor-parallel ones of :mod:`rtllm.layers.parallel_linear` (heads
and the vocabulary split over ranks); with ``pp_size > 1`` a stage builds only its
contiguous range of decoder layers (the others are parameter-free placeholders, so
names stay global), the first stage the embedding and the last the norm and LM head;
hidden states and residuals travel between stages with send/recv inside
:meth:`LlamaModel.forward`. Attention layers index the stage's own KV caches
(``kv_index`` = layer index within the stage).
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.distributed import parallel_state
from rtllm.layers.activation import SiluAndMul
from rtllm.layers.attention import Attention
from rtllm.layers.linear import Linear, MergedLinear, QKVLinear
from rtllm.layers.norm import RMSNorm
from rtllm.layers.parallel_linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from rtllm.layers.rotary import RotaryEmbedding
from rtllm.models.config import ModelConfig
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.rtn import Fp8Tokens


class LlamaAttention(nn.Module):
    """Self-attention with grouped-query heads, rotary embedding and optional q/k norm."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        rotary: RotaryEmbedding,
        quant_config: QuantConfig | None = None,
        prefix: str = "",
        kv_index: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        if parallel_state.get_mapping().tp_size > 1:
            self.qkv_proj = QKVParallelLinear(
                config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
                bias=config.attention_bias, prefix=f"{prefix}.qkv_proj", quant_config=quant_config,
            )
            self.o_proj = RowParallelLinear(
                config.num_attention_heads * self.head_dim, config.hidden_size,
                bias=config.attention_output_bias, prefix=f"{prefix}.o_proj", quant_config=quant_config,
            )
            # The rank's own heads (KV heads replicated when fewer than ranks).
            self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        else:
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.qkv_proj = QKVLinear(
                config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=config.attention_bias,
                quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
            )
            self.o_proj = Linear(
                self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias,
                quant_config=quant_config, prefix=f"{prefix}.o_proj",
            )
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = rotary
        self.attn = Attention(
            layer_idx if kv_index is None else kv_index,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=self.head_dim**-0.5,
            sliding_window=config.sliding_window,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Tokens) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(num_tokens, q_size))


class LlamaMLP(nn.Module):
    """Gated SiLU MLP with fused gate/up projection."""

    def __init__(self, config: ModelConfig, quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        size = config.intermediate_size
        if parallel_state.get_mapping().tp_size > 1:
            self.gate_up_proj = MergedColumnParallelLinear(
                config.hidden_size, [size, size], [0, 1], bias=config.mlp_bias, prefix=f"{prefix}.gate_up_proj",
                quant_config=quant_config, shard_names=["gate_proj", "up_proj"],
            )
            self.down_proj = RowParallelLinear(
                size, config.hidden_size, bias=config.mlp_bias, prefix=f"{prefix}.down_proj",
                quant_config=quant_config,
            )
        else:
            self.gate_up_proj = MergedLinear(
                config.hidden_size, [size, size], [0, 1], bias=config.mlp_bias,
                quant_config=quant_config, prefix=f"{prefix}.gate_up_proj", shard_names=["gate_proj", "up_proj"],
            )
            self.down_proj = Linear(
                size, config.hidden_size, bias=config.mlp_bias, quant_config=quant_config,
                prefix=f"{prefix}.down_proj",
            )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor | Fp8Tokens) -> torch.Tensor:
        fp8_out = self.down_proj.fp8_token_input
        if not fp8_out:
            # Weight-only layers on CUDA apply the activation inside the gate_up kernel.
            fused = self.gate_up_proj.silu_and_mul_forward(x)
            if fused is not None:
                return self.down_proj(fused)
        return self.down_proj(self.act(self.gate_up_proj(x), fp8_out=fp8_out))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + MLP block; the residual add is fused into the next norm."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        rotary: RotaryEmbedding,
        quant_config: QuantConfig | None = None,
        kv_index: int | None = None,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(config, layer_idx, rotary, quant_config, f"{prefix}.self_attn", kv_index)
        self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Under dynamic per-token FP8 the norms emit FP8 codes for the projections that
        # follow (one kernel instead of a norm and a quantization).
        fp8_qkv = self.self_attn.qkv_proj.fp8_token_input
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden, fp8_out=fp8_qkv)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, fp8_out=fp8_qkv)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(
            hidden, residual, fp8_out=self.mlp.gate_up_proj.fp8_token_input
        )
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: ModelConfig, quant_config: QuantConfig | None = None) -> None:
        super().__init__()
        mapping = parallel_state.get_mapping()
        self.mapping = mapping
        self.hidden_size = config.hidden_size
        self.layer_range = mapping.pp_layers(config.num_hidden_layers)
        if mapping.is_first_pp_rank:
            if mapping.tp_size > 1:
                self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            else:
                self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
                self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        start = self.layer_range.start
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, quant_config, kv_index=i - start)
            if i in self.layer_range
            else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        if mapping.is_last_pp_rank:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states on the last stage; on an earlier stage, the stage's
        output hidden states (already sent on to the next stage)."""
        mapping = self.mapping
        if mapping.is_first_pp_rank:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            first = self.layers[self.layer_range.start].input_layernorm.weight
            shape = (2, input_ids.shape[0], self.hidden_size)
            hidden, residual = parallel_state.recv(shape, first.dtype, mapping.prev_pp_rank).unbind(0)
        for i in self.layer_range:
            hidden, residual = self.layers[i](positions, hidden, residual)
        if not mapping.is_last_pp_rank:
            # Every stage has a layer, so the residual exists here.
            parallel_state.send(torch.stack([hidden, residual]), mapping.next_pp_rank)
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MissingLayer(nn.Module):
    """Placeholder for a decoder layer held by another pipeline stage (no parameters)."""

    def forward(self, *args: object) -> None:
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


class LlamaForCausalLM(nn.Module):
    """Causal LM head over :class:`LlamaModel`; ``forward`` returns hidden states,
    ``compute_logits`` the logits of the rows that are sampled."""

    # checkpoint module name -> (fused module name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, quant_config: QuantConfig | None = None) -> None:
        # quant_config quantizes the decoder's linear layers; the embedding and lm_head
        # stay float (TensorRT-LLM's default too), so tied embeddings stay tied.
        super().__init__()
        mapping = parallel_state.get_mapping()
        if config.tie_word_embeddings and mapping.pp_size > 1:
            raise NotImplementedError(
                "tied word embeddings under pipeline parallelism are not supported yet (the last stage "
                "would need the embedding); use pipeline_parallel_size=1"
            )
        self.config = config
        self.quant_config = quant_config
        self.mapping = mapping
        self.model = LlamaModel(config, quant_config)
        if not mapping.is_last_pp_rank:
            return
        if mapping.tp_size > 1:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def owns_checkpoint_tensor(self, name: str) -> bool:
        """True when checkpoint tensor ``name`` belongs to this pipeline stage."""
        mapping = self.mapping
        if mapping.pp_size == 1:
            return True
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.model.layer_range
        if name.startswith("model.embed_tokens."):
            return mapping.is_first_pp_rank
        if name.startswith(("model.norm.", "lm_head.")):
            return mapping.is_last_pp_rank
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
