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


# ---------------------------------------------------------------------------------------------------------------
# The coverage sweep: a tiny config for any model type, built from its default config.

SWEEP_VOCAB = 211  # prime, above every special token id the tiny configs set
# Size fields, wherever they appear in a config or its sub-configs (text, vision, audio ...).
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "n_embed": 32, "word_embed_proj_dim": 32,
    "intermediate_size": 48, "ffn_dim": 48, "d_ff": 48, "n_inner": 48, "decoder_ffn_dim": 48, "encoder_ffn_dim": 48,
    "ffn_hidden_size": 48, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_k": 2, "top_k": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8,
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "rotary_dim": 4, "d_head": 8,
    "image_size": 28, "patch_size": 14, "sliding_window": 16, "decoder_vocab_size": 211,
    "out_hidden_size": 32, "text_hidden_size": 32, "mamba_n_heads": 4, "mamba_d_head": 16,
    # Widths and tables that the names above miss; unshrunk they made single cases of hundreds of millions of
    # parameters (Qwen2-VL's vision tower 658M, Kosmos-2's text width 425M, Gemma 4's per-layer table 134M).
    "embed_dim": 32, "emb_dim": 32, "projection_dim": 32, "depth": 2, "vocab_size_per_layer_input": SWEEP_VOCAB,
    "encoder_hash_byte_group_vocab": SWEEP_VOCAB, "zero_expert_num": 2, "moe_topk": 2, "expert_ffn_hidden_size": 16,
    "latent_query_num": 8, "num_embeddings": 64, "hidden_size_global": 32,
}
# Fields of one kind: equal ones in a default config stay equal when shrunk, to the smallest (head sizes) or to
# the query heads' count (so a multi-head default keeps heads x head_dim == hidden_size, which e.g. Helium's output
# projection assumes).
RELATED_SIZES = ((("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), min),
                 (("num_attention_heads", "num_key_value_heads"), max))
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# Logit transforms, loss coefficients and router outputs at non-default values, so that a dropped one shows.
NON_DEFAULT = {
    "final_logit_softcapping": 3.0, "logit_softcapping": 3.0, "logits_soft_cap": 3.0, "logit_scale": 0.5,
    "logits_scaling": 4.0, "lm_head_multiplier": 0.5, "output_multiplier": 0.5, "z_loss_coefficient": 0.01,
    "router_aux_loss_coef": 0.1, "aux_loss_coef": 0.1, "output_router_logits": True,
}
QSA_INDEXER = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
               "indexer_compress_ratio": 4}
# Per-type config fields where a default config cannot be shrunk generically (kept as small as possible).
SWEEP_OVERRIDES: dict[str, dict] = {
    "mamba2": {"head_dim": 16},  # heads * head_dim == expand * hidden_size
    "falcon_h1": {"mamba_d_ssm": 32},  # == mamba_n_heads * mamba_d_head
    "zaya": {"num_experts_per_tok": 1},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 0, "n_output_layers": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    # Two hybrid layers, so the shared transformer block has a layer to be tied to; derived sizes recomputed.
    "zamba": {"layers_block_type": ["hybrid", "hybrid"], "attention_hidden_size": None, "attention_head_dim": None,
              "mamba_dt_rank": 2},
    # The default's indexed-attention layers need the QSA indexer fields, which the default leaves unset.
    "qwen4_exp": QSA_INDEXER,
    "qwen4_exp_text": QSA_INDEXER,
}
# Types whose rotary embedding falls back to a built-in multimodal section split when the config names none.
MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl", "paddleocr_vl", "glm4v", "glm4v_moe", "glm46v", "glm_ocr", "glmga")


def _is_config_dict(value) -> bool:
    return isinstance(value, dict) and ("model_type" in value or "hidden_size" in value)


def _subsample(layers, n: int) -> list:
    """n of the per-layer entries, in order, keeping one layer of each distinct kind first (hybrids keep their
    attention layers)."""
    firsts = sorted({v if isinstance(v, (str, int, float, bool, type(None))) else repr(v): i
                     for i, v in reversed(list(enumerate(layers)))}.values())
    chosen = firsts[:n] + [i for i in range(len(layers)) if i not in firsts][:max(0, n - len(firsts))]
    return [layers[i] for i in sorted(chosen)]


def _shrink(values: dict, top: bool, mrope: bool = False) -> dict:
    out = dict(values)
    old_layers = next((values[k] for k in LAYER_COUNT_KEYS if isinstance(values.get(k), int)), None)
    for key, value in values.items():
        if _is_config_dict(value):
            out[key] = _shrink(value, top=False, mrope=mrope)
        elif key in ("num_experts_per_tok", "top_k") and value is None and "n_routed_experts" in values:
            out[key] = 2
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, SIZES[key]) if key not in ("num_experts_per_tok", "top_k", "moe_k") else 2
        elif key == "sliding_window" and value is None:
            continue
        elif key in NON_DEFAULT and (value is None or isinstance(value, (int, float))):
            out[key] = NON_DEFAULT[key]
        elif ("dropout" in key or key.endswith("_pdrop") or key.endswith("drop_rate")) and isinstance(value, float):
            out[key] = 0.0
        elif key == "vocab_size" and isinstance(value, int):
            out[key] = SWEEP_VOCAB
        elif key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id") and value is not None:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1}.get(key, 2)
    new_layers = next((out[k] for k in LAYER_COUNT_KEYS if isinstance(out.get(k), int)), None)
    if old_layers and new_layers and new_layers != old_layers:
        for key, value in values.items():  # per-layer lists, patterns and dicts follow the layer count
            if isinstance(value, list) and len(value) == old_layers:
                out[key] = _subsample(value, new_layers)
            elif isinstance(value, str) and len(value) == old_layers and ("pattern" in key or "layer" in key):
                out[key] = "".join(_subsample(value, new_layers))
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                out[key] = {k: v for k, v in value.items() if int(k) < new_layers}
    # Size fields equal in the default config stay equal (MLA: head_dim == qk_rope_head_dim, kv heads == heads ...).
    groups: dict[tuple, list[str]] = {}
    for related, pick in RELATED_SIZES:
        for key in related:
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool) and key in out:
                groups.setdefault((related, pick, values[key]), []).append(key)
    for (_, pick, _), keys in groups.items():
        value = pick(out[k] for k in keys)
        for k in keys:
            out[k] = value
    if isinstance(values.get("qk_head_dim"), int) and values["qk_head_dim"] == (values.get("qk_nope_head_dim") or 0) + (
            values.get("qk_rope_head_dim") or 0):
        out["qk_head_dim"] = out.get("qk_nope_head_dim", 0) + out.get("qk_rope_head_dim", 0)
    heads = out.get("num_attention_heads")
    if "head_dim" in out and out["head_dim"] is None and isinstance(heads, int) and "hidden_size" in out:
        out["head_dim"] = out["hidden_size"] // heads  # some defaults leave the derived value unset
    if "num_key_value_heads" in out and out["num_key_value_heads"] is None and isinstance(heads, int):
        out["num_key_value_heads"] = heads
    for key in ("rope_parameters", "rope_scaling"):
        rope = out.get(key)
        if isinstance(rope, dict) and (isinstance(rope.get("mrope_section"), list) or (
                mrope and "rope_theta" in rope)) and "hidden_size" in out and "num_attention_heads" in out:
            # The sections split the rotary half-dimension: they must sum to it.
            head = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
            factor = rope.get("partial_rotary_factor", out.get("partial_rotary_factor")) or 1.0
            half, n = int(head * factor) // 2, len(rope.get("mrope_section", [0, 0, 0]))
            out[key] = {**rope, "mrope_section": [half - (n - 1) * (half // n)] + [half // n] * (n - 1)}
    return out


def tiny_config(model_type: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    default = AutoConfig.for_model(model_type)
    values = _shrink(default.to_dict(), top=True, mrope=model_type in MROPE_TYPES)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        values["is_decoder"], values["add_cross_attention"] = True, False
    values.update(SWEEP_OVERRIDES.get(model_type, {}))
    if "text_config" in values and model_type in SWEEP_OVERRIDES:
        values["text_config"] = {**values["text_config"], **SWEEP_OVERRIDES[model_type]}
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(default)(**values)


def sweep_cases() -> dict[str, tuple[str, str]]:
    """``{case id: (model type, model class name)}``: each type with its causal-LM class and, where the
    image-text-to-text mapping names another class, that one too (id ``type/image-text``)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
    )

    cases = {}
    for model_type in sorted(set(CAUSAL) | set(IMAGE_TEXT)):
        names = [CAUSAL.get(model_type), IMAGE_TEXT.get(model_type)]
        if names[0] is not None:
            cases[model_type] = (model_type, names[0])
        if names[1] is not None and names[1] != names[0]:
            cases[model_type if names[0] is None else f"{model_type}/image-text"] = (model_type, names[1])
    return cases
