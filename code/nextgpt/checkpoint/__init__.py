"""What a checkpoint is: its layout (names, resolve, portable paths), the delta it holds (delta), resuming (resume),
the original's key layout (legacy), the base it was trained on (fingerprint), the PEFT adapter's card
(adapter_card) and building a model from one (load).

`nextgpt.checkpoint.load_checkpoint(model, folder)` is what exported adapter cards tell users to call, so the name
stays here; it is looked up on first use, so importing a submodule does no other work."""


def __getattr__(name: str):
    if name == "load_checkpoint":
        from nextgpt.checkpoint.delta import load_checkpoint  # lazy: the package's name for it, not an import cycle
        return load_checkpoint
    raise AttributeError(f"module 'nextgpt.checkpoint' has no attribute {name!r}")
