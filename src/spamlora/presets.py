"""GPT-2's published sizes, the names of the Linear layers of a block that LoRA can adapt,
and the choices of what a classifier trains and reads. Plain tables without torch: params
validation reads them in every stage."""

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

# What training updates (train.trainable), with the meanings of LLMs-from-scratch's
# ch06 experiments: LoRA; every weight; the last one or two blocks with the final
# LayerNorm; nothing. The 2-class head is trained in every mode.
TRAINABLE = ("lora", "all", "last_block", "last_two_blocks", "last_layer")

# Which hidden state of each message the head reads (train.token): its last token (which
# alone has seen the whole message), its first, or the mean over its tokens.
TOKENS = ("last", "first", "mean")

# Where the base's weights come from (model.weights): the published checkpoint, or
# PyTorch's module defaults seeded by train.seed, as the book's `--weights random`.
WEIGHTS = ("pretrained", "random")
