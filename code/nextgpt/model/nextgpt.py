"""NExT-GPT: ImageBind features -> input_proj -> Vicuna (+ signal tokens) -> output projectors.

    media feature (N, F) --input_proj--> (N, D) soft tokens, written at batch["media_positions"]
    inputs_embeds (B, L, D) --LLM--> logits (B, L, V) -> LM loss, token accuracy
                              \\--> hidden_states[cfg.model.hidden_layer] (B, L, D)
    at every signal block (batch["signal_blocks"], recorded when the sample was encoded):
        hidden (n, N, D) + input embeddings (n, N, D)
        --output_proj[modality]--> (n, T, D_out) -- l2 / mse --> caption_embeds[modality] (n, T, D_out)
                                                 \\-- frozen decoder UNet, MSE to its noise / velocity target
                                                     (gen_<modality>, model/denoising.py, when attached)

A stage is configuration: which modules train (model/trainable.py: set_trainable), which loss terms count
(cfg.train.loss_weights, given at construction as LossSettings; the terms are model/losses.py's).

Any batch on any rank: a trainable module that this micro-batch does not use but another rank's does runs here
on nothing (unused_here): input_proj on an empty (0, F) batch when there is no medium, an output projector on an
empty (0, N, D) batch (project_nothing) when its modality has no signal block, their sums (0) added to the loss.
Why: DeepSpeed's ZeRO-2 reduces gradients in buckets that per-parameter hooks fill in the order backward produces
the gradients, and every rank must fill them alike. A parameter without a gradient on one rank (a modality only
another rank's micro-batch has) desynchronises the collectives (gloo: "Received data size doesn't match"; NCCL: a
hang), and the same gradients in another order would be summed into the wrong slots. So the modules run in one
fixed order on every rank (embed, input_proj, LLM, output_proj in model.modalities order), nothing that a real
batch computes changes, and the extra gradients are exact zeros: the values equal one process over the same global
batch. Which modules some rank uses is one all-reduce of a flag per module per training micro-batch; the empty runs
cost only their operations' launches (~10 ms for a tiny projector on a CPU), so they happen only where needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from nextgpt import runtime
from nextgpt.imagebind.encode import LazyEncoder
from nextgpt.model import llm as llm_utils
from nextgpt.model import suffix
from nextgpt.model.losses import alignment_loss, check_signal_labels, lm_loss_and_accuracy
from nextgpt.model.projectors import build_input_proj, build_output_proj
from nextgpt.modalities import MODALITIES, conditioning_shape

if TYPE_CHECKING:
    from nextgpt.data.types import Media, Turn

@dataclass
class Generation:
    text: str                                                   # the answer, up to (not including) "###"
    outputs: list[tuple[str, torch.Tensor]] = field(default_factory=list)   # (modality, (1, T, D) conditioning)
    truncated: list[str] = field(default_factory=list)          # modalities whose block max_new_tokens cut off
    malformed: list[str] = field(default_factory=list)          # modalities whose block came out of order
    token_ids: list[int] = field(default_factory=list)          # generated ids up to and including the stop


def imagebind_dim(preset_name: str) -> int:
    """Output size of the configured ImageBind preset (huge: 1024)."""
    from nextgpt.imagebind.model import preset

    config = preset(preset_name)
    for key in ("out_embed_dim", "out_dim"):
        if key in config:
            return int(config[key])
    raise ValueError(f"ImageBind preset {preset_name!r} has no out_embed_dim")


def takes_part(module: nn.Module) -> bool:
    """Whether `module` must take part in every rank's backward: it has a trainable parameter and this pass records
    gradients (training; evaluation and generation, under no_grad, need nothing and communicate nothing)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


@dataclass
class LossSettings:
    """What forward computes, given at construction (build_model takes them from the stage's train.* settings and
    the device decision), not read from a config inside forward."""
    weights: dict[str, float]                   # train.loss_weights: term -> weight in "loss"
    alignment: str = "l2"                       # train.alignment_loss: l2 | mse
    suffix_backward: bool = True                # train.suffix_backward (model/suffix.py; exact, a speed choice)
    # split only where suffix.worth_splitting says the third LLM pass pays: the roofline of a weight-bound GPU
    # (build_model sets it when the model is built on a GPU); on the CPU every split pays
    split_by_roofline: bool = False

    @classmethod
    def from_config(cls, train, device: "str | torch.device | None" = None) -> "LossSettings":
        return cls(dict(train.loss_weights), train.alignment_loss, train.suffix_backward,
                   device is not None and torch.device(device).type == "cuda")


class NextGPT(nn.Module):
    def __init__(self, cfg, llm, tokenizer, token_ids, imagebind_dim: int, conditioning_shapes: dict[str, tuple],
                 losses: LossSettings | None = None, media_encoder=None):
        super().__init__()
        self.cfg = cfg
        self.losses = losses if losses is not None else LossSettings.from_config(cfg.train)
        self.llm = llm                                          # LlamaForCausalLM or a PeftModel around it
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.token_rows = cfg.train.token_rows                  # the PEFT structure was built for this
        self.hidden_layer = cfg.model.hidden_layer              # whose hidden states feed output_proj
        hidden = self.causal_lm.config.hidden_size
        self.input_proj = build_input_proj(imagebind_dim, hidden)
        self.conditioning_shapes = dict(conditioning_shapes)
        self.output_proj = nn.ModuleDict({
            m: build_output_proj(cfg.model.output_proj.mode, hidden, MODALITIES[m].num_signal_tokens,
                                 tuple(conditioning_shapes[m]), cfg.model.output_proj)
            for m in cfg.model.modalities})
        # Whole embed_tokens / lm_head matrices belong in the delta (token_rows=all, or a whole matrix was loaded,
        # e.g. from the original's checkpoint, so rows beyond the 38 differ from the base model).
        self.full_token_matrices = self.token_rows == "all"
        # Groups whose values a delta must carry: trained here (set_trainable) or loaded (checkpoint.load_*).
        self.delta_groups: set[str] = set()
        # model/denoising.Denoising (frozen UNets + VAEs, not submodules) when a gen_<modality> weight is set;
        # train.py attaches it (denoising.build), so inference never loads a UNet for a loss it does not compute
        self.denoising = None
        # ImageBind for batches without cached features (imagebind.encode.LazyEncoder: loads on first use; not a
        # submodule); None: every batch must carry its features
        self.media_encoder = media_encoder

    # ------------------------------------------------------------------------------------------------------------
    @property
    def causal_lm(self):
        return llm_utils.causal_lm(self.llm)

    @property
    def stop(self) -> str:
        """Generation stops at this text: "###" (vicuna_v0) or the chat template's turn end, e.g. <|im_end|>."""
        from nextgpt.data.conversation import template_of

        return template_of(self.token_ids).stop

    @property
    def device(self) -> torch.device:
        return self.input_proj.weight.device

    @torch.no_grad()
    def encode_media(self, paths: Sequence[str], modalities: Sequence[str]) -> torch.Tensor:
        """(N, F) ImageBind features of media files, in the given order (one encoder call per modality)."""
        encoder = self.media_encoder
        if encoder is None:
            raise ValueError("the batch has no cached ImageBind features and this model was given no media_encoder "
                             "(build_model gives one)")
        features: list[torch.Tensor | None] = [None] * len(paths)
        for modality in dict.fromkeys(modalities):
            index = [i for i, m in enumerate(modalities) if m == modality]
            encoded = encoder.encode([paths[i] for i in index], modality)
            for row, i in enumerate(index):
                features[i] = encoded[row]
        return torch.stack(features)

    def embed(self, input_ids: torch.Tensor, media_positions: torch.Tensor | None = None,
              media_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (inputs_embeds with the soft tokens written in, token embeddings), both (B, L, D)."""
        token_embeds = self.causal_lm.get_input_embeddings()(input_ids)
        if media_positions is None or media_positions.numel() == 0:
            return token_embeds, token_embeds
        if media_features is None or media_features.shape[0] != media_positions.shape[0]:
            raise ValueError(f"{media_positions.shape[0]} media positions but "
                             f"{None if media_features is None else media_features.shape[0]} media features")
        soft = self.input_proj(media_features.to(self.device, self.input_proj.weight.dtype))    # (N, D)
        positions = media_positions.to(input_ids.device)
        inputs_embeds = token_embeds.index_put((positions[:, 0], positions[:, 1]), soft.to(token_embeds.dtype))
        return inputs_embeds, token_embeds

    def _batch_media(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        positions = batch.get("media_positions")
        if positions is None or positions.numel() == 0:
            return None, None
        features = batch.get("media_features")
        if features is None:
            features = self.encode_media(batch["media_paths"], batch["media_modalities"])
        return positions, features

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: the collate dict (input_ids, labels, attention_mask, media_*, caption_embeds, samples).

        -> {"loss", "lm", <modality>: alignment term for each modality with signal blocks and a loss weight,
            gen_<modality>: its denoising term when self.denoising has it, "token_acc"}
        """
        weights = self.losses.weights
        device = self.device
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        positions, features = self._batch_media(batch)
        # {modality: (n, 2) (row, start)} in (row, position) order = caption_embeds order (collate)
        if "signal_blocks" not in batch:
            raise ValueError("the batch has no signal_blocks (batches come from nextgpt.data.collate.Collator)")
        blocks = {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items() if v.numel()}
        denoised = [m for m in blocks if self.denoising is not None and m in self.denoising]
        wanted = [m for m in blocks if weights.get(m, 0.0) != 0.0 or m in denoised]
        on_nothing = self.unused_here(positions is not None, wanted)

        inputs_embeds, token_embeds = self.embed(input_ids, positions, features)
        unused = torch.zeros((), device=device)         # the zero outputs of modules run on nothing
        if "input_proj" in on_nothing:
            # (0, F) -> (0, D) here, where input_proj runs on media; its empty sum (0) goes to the loss rather than
            # into inputs_embeds, whose gradients then stay bit-identical
            nothing = self.input_proj.weight.new_zeros((0, self.input_proj.in_features))
            unused = unused + self.input_proj(nothing).sum()

        check_signal_labels(labels, blocks, self.token_ids.signal, batch.get("samples"))

        split = self._split(input_ids, attention_mask, positions, blocks)
        if split is None:                                   # one pass with gradients everywhere
            out = self.causal_lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 output_hidden_states=bool(wanted), use_cache=False)
            lm, accuracy = lm_loss_and_accuracy(out.logits, labels)
            hidden_all = out.hidden_states if wanted else None
        else:                                               # prefix no_grad + KV cache, suffix with gradients
            lm, accuracy, hidden_all = suffix.split_forward(
                self.causal_lm, inputs_embeds, attention_mask, labels, split, attention_mask.sum(1).tolist(),
                output_hidden_states=bool(wanted))
        terms: dict[str, torch.Tensor] = {"lm": lm}
        caption_embeds = batch.get("caption_embeds") or {}
        if missing := [m for m in wanted if m not in self.output_proj]:
            raise ValueError(f"the batch has {missing[0]} signal blocks but the model has no {missing[0]} output "
                             f"projector (model.modalities: {list(self.output_proj)})")
        for modality in self.output_proj:             # one fixed order on every rank (see the module docstring)
            if modality not in wanted:
                if modality in on_nothing:                     # x 0: qformer's one zero block is not empty
                    unused = unused + 0.0 * self.project_nothing(modality).float().sum()
                continue
            if modality not in caption_embeds and weights.get(modality, 0.0) != 0.0:
                raise ValueError(f"the batch has {modality} signal blocks but no caption_embeds[{modality!r}]")
            hidden_states = hidden_all[self.hidden_layer]
            prediction = self.project(modality, hidden_states, token_embeds, blocks[modality], split)
            if modality in denoised:        # (n, T, D_out) conditions the frozen UNet; grad flows back through it
                terms[MODALITIES[modality].generation_loss_key] = self.denoising(modality, prediction, batch)
            if weights.get(modality, 0.0) == 0.0:
                continue                    # denoising only: no alignment term
            target = caption_embeds[modality].to(device)
            if target.shape[0] != prediction.shape[0]:
                raise ValueError(f"{modality}: {prediction.shape[0]} signal blocks in the batch but "
                                 f"{target.shape[0]} caption embeddings")
            if target.numel() != prediction.numel():
                raise ValueError(f"{modality}: caption embeddings of shape {tuple(target.shape[1:])} but the "
                                 f"{modality} decoder needs {tuple(prediction.shape[1:])} (embeddings computed "
                                 "with a different decoder?)")
            terms[modality] = alignment_loss(prediction, target.view(prediction.shape), self.losses.alignment)
        loss = sum(weights.get(name, 0.0) * value for name, value in terms.items()) + unused
        return {"loss": loss, **terms, "token_acc": accuracy}

    def _split(self, input_ids, attention_mask, media_positions, blocks) -> list[int] | None:
        """Per-row prefix lengths for suffix backward (model/suffix.py), or None for one full pass."""
        if not (self.losses.suffix_backward and torch.is_grad_enabled()):
            return None
        causal_lm = self.causal_lm
        if getattr(causal_lm, "is_activation_checkpointing", False):
            return None                     # HF drops the KV cache of checkpointed layers while grad is on
        if causal_lm.config._attn_implementation not in suffix.ATTENTION_WITH_4D_MASK:
            return None
        inputs = suffix.trainable_inputs(self)
        if inputs is None:
            return None
        lengths = attention_mask.sum(1).tolist()
        split = suffix.split_points(input_ids, lengths, media_positions, blocks, inputs)
        if max(split) == 0:
            return None
        if self.losses.split_by_roofline and not suffix.worth_splitting(*input_ids.shape, split, lengths):
            return None                     # weight-bandwidth-bound (small micro-batch): 3 passes cost more than 2
        return split

    def project(self, modality: str, hidden_states: torch.Tensor, token_embeds: torch.Tensor,
                starts: Sequence[tuple[int, int]], offsets: Sequence[int] | None = None) -> torch.Tensor:
        """Output projector on signal blocks at (row, start): (n, N, D) hidden + input embeddings -> (n, T, D_out).

        offsets: per row, where hidden_states begins in the sequence (suffix backward), else 0."""
        n = MODALITIES[modality].num_signal_tokens
        rows = torch.tensor([r for r, _ in starts for _ in range(n)], device=hidden_states.device)
        columns = torch.tensor([s + i for _, s in starts for i in range(n)], device=hidden_states.device)
        shift = torch.tensor([offsets[r] if offsets else 0 for r, _ in starts for _ in range(n)],
                             device=hidden_states.device)
        hidden = hidden_states[rows, columns - shift].view(len(starts), n, -1)
        inputs = token_embeds[rows, columns].view(len(starts), n, -1)
        projector = self.output_proj[modality]
        dtype = next(projector.parameters()).dtype
        return projector(hidden.to(dtype), inputs.to(dtype))

    def unused_here(self, has_media: bool, wanted: Sequence[str]) -> set[str]:
        """The trainable modules ("input_proj", output projector modalities) that this micro-batch leaves unused
        but another rank's uses: they run on nothing here (module docstring). Every rank calls this in every
        training forward; one all-reduce, none on one process or without gradients."""
        modules = {"input_proj": self.input_proj, **self.output_proj}
        names = [name for name, module in modules.items() if takes_part(module)]
        if not names:
            return set()
        here = [has_media if name == "input_proj" else name in wanted for name in names]
        anywhere = runtime.any_rank_each(here, self.device)
        return {name for name, mine, any_rank in zip(names, here, anywhere) if any_rank and not mine}

    def project_nothing(self, modality: str) -> torch.Tensor:
        """The output projector on no signal block, (0, N, D) -> (0, T, D_out): the same operations as on real
        blocks, no FLOPs; a projector that cannot take an empty batch (qformer) gets one all-zero block."""
        projector = self.output_proj[modality]
        rows = 0 if projector.takes_empty_batch else 1
        zeros = next(projector.parameters()).new_zeros((rows, MODALITIES[modality].num_signal_tokens,
                                                        self.causal_lm.config.hidden_size))
        return projector(zeros, zeros)

    # ------------------------------------------------------------------------------------------------------------
    def generate(self, prompt: "str | Sequence[Turn]", media: "Sequence[Media]" = (), max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 do_sample: bool | None = None) -> Generation:
        """Answer a prompt (text or turns ending with a human turn) about optional input media; settings left None
        come from cfg.inference, sampling draws from the current torch random state.

        A shorthand for one conversation through nextgpt.model.generate, the one generation path (inference.py, app.py
        and evaluate.py use it directly: batches, streaming, decoding to files).
        """
        from nextgpt.data.types import Turn
        from nextgpt.model.generate import Conversation, Sampling, generate

        if self.tokenizer is None:
            raise ValueError("generate needs the model's tokenizer")
        turns = [Turn("human", prompt)] if isinstance(prompt, str) else list(prompt)
        sampling = Sampling.from_config(self.cfg.inference, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, do_sample=do_sample)
        (reply,) = generate(self, [Conversation(turns, list(media))], sampling, seed=None)
        return Generation(text=reply.text, outputs=[(o.modality, o.conditioning) for o in reply.outputs],
                          truncated=reply.truncated, malformed=reply.malformed, token_ids=reply.token_ids)


# ----------------------------------------------------------------------------------------------------------------
def conditioning_shapes(cfg) -> dict[str, tuple[int, int]]:
    shapes = {}
    for modality in cfg.model.modalities:
        if modality not in cfg.model.decoders:
            raise ValueError(f"model.decoders has no entry for {modality} (needed for its conditioning shape)")
        shapes[modality] = conditioning_shape(modality, cfg.path(cfg.model.decoders[modality]))
    return shapes


def build_model(cfg, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> NextGPT:
    """Vicuna + tokens + PEFT as configured, fresh projectors sized from ImageBind and the decoders."""
    from nextgpt.tokens import load_tokenizer

    llm_path = cfg.path(cfg.model.llm)
    tokenizer, token_ids = load_tokenizer(llm_path, cfg.model.template)
    shapes = conditioning_shapes(cfg)
    feature_dim = imagebind_dim(cfg.model.imagebind_preset)
    llm = llm_utils.load_llm(llm_path, dtype=dtype, device=device, quantization=cfg.model.quantization)
    llm_utils.resize_for_tokens(llm, len(tokenizer))
    llm = llm_utils.wrap_llm(llm, token_ids, cfg.train.token_rows, cfg.model.lora, cfg.model.quantization,
                             cfg.model.gradient_checkpointing)
    media_encoder = LazyEncoder(cfg.path(cfg.model.imagebind), cfg.model.imagebind_preset, device=device or "cpu",
                                dtype=dtype or torch.float32)    # the model's device and projector dtype
    model = NextGPT(cfg, llm, tokenizer, token_ids, feature_dim, shapes, LossSettings.from_config(cfg.train, device),
                    media_encoder)
    model.input_proj.to(device=device, dtype=dtype or torch.float32)
    model.output_proj.to(device=device, dtype=dtype or torch.float32)
    return model
