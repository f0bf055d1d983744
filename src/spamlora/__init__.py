"""spamlora: fine-tune GPT-2 with LoRA to classify SMS spam, as a DVC + MLflow pipeline."""

__version__ = "0.1.0"
__all__ = ["load_gpt2"]


def __getattr__(name: str):
    # Lazy: `import spamlora` alone does not import torch.
    if name == "load_gpt2":
        from .weights import load_gpt2

        return load_gpt2
    raise AttributeError(f"module 'spamlora' has no attribute {name!r}")
