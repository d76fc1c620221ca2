"""kogpt: run, generate with, train, evaluate and export Korean GPT models (KoGPT2 and KoGPT families).

    from kogpt import KoGPT
    gpt = KoGPT.from_pretrained("skt/kogpt2-base-v2"); print(gpt.generate("안녕하세요"))
"""

__version__ = "0.1.0"
__all__ = ["KoGPT", "GPTConfig", "Tokenizer", "SamplingConfig"]

_EXPORTS = {"KoGPT": "api", "GPTConfig": "core.config", "Tokenizer": "text.tokenizer",
            "SamplingConfig": "generation.sampling"}


def __getattr__(name: str):  # imported on first use, so `kogpt --help` does not wait for torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kogpt' has no attribute {name!r}")
