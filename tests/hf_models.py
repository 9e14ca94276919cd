"""Tiny random-initialised transformers causal LMs of many families, built from configs (no downloads)."""

import torch

VOCAB = 1031  # odd, so no kernel block divides it
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Per-family config fields: MoE sizes, and the logit transforms set to values that change the loss visibly.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, output_router_logits=True),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      output_router_logits=True),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, final_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=16, final_logit_softcapping=3.0),
    "phi3": {},
    "olmo2": {},
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=0.5),
    "starcoder2": {},
    "gpt_neox": dict(rotary_pct=0.5),
}


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # a random head gives near-uniform logits; scale it so the loss depends on it
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def batch(batch_size=2, seq=17, seed=1, pad_last=3):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -pad_last:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
