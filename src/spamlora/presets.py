"""GPT-2's published sizes, and the names of the Linear layers of a block that LoRA can
adapt. Plain tables without torch: params validation reads them in every stage."""

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
}

# Friendly target names -> module path inside each transformer block.
TARGET_MODULES = {
    "query": "att.W_query",
    "key": "att.W_key",
    "value": "att.W_value",
    "attn_out": "att.out_proj",
    "mlp_fc": "ff.layers.0",
    "mlp_proj": "ff.layers.2",
}

# How LoRA's A starts (lora.LoRALayer): fan-in r as LLMs-from-scratch, or in_dim as Hu et
# al.'s reference code and PEFT.
LORA_INITS = ("textbook", "reference")
