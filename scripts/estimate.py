"""What a training run will cost, before launching it: FLOPs and tokens per sample, memory per GPU, samples/s and
epoch time at a GPU's peak and a given MFU.

    python scripts/estimate.py --config code/config/stage_2.yaml                      # 7B shape, 8 x H100, MFU 0.40
    python scripts/estimate.py --config code/config/stage_3.yaml --gpus 8 --gpu A100-80GB --mfu 0.35
    python scripts/estimate.py --config code/config/tiny/stage_2.yaml --set data.root=data/toy --shape config

Tokens per sample come from the real template: every record of the configured datasets (up to --max-records per
dataset, evenly spaced) is encoded by conversation.encode with the configured tokenizer (model.llm; --tokenizer
to count with another one), and each sample's split point is the one NextGPT.forward uses (suffix backward: the
first input that depends on a trainable parameter, or the first signal block).

FLOPs per sample, as the step actually runs them (N = LLM parameters without the input embedding table):
    forward    2·N·T + attention 4·d·layers·Σ_q ctx(q) (QKᵀ and AV over q's causal context)
    backward   2·N·G activation gradients over the G tokens that run with gradients (suffix backward: the suffix;
               else all T; the frozen weights need no weight gradient) + 2x the attention of those queries
               + 2·N_lora·G LoRA weight gradients; + the forward of G again with gradient checkpointing
    projectors 6·P·(K + T_out) per signal block (P: that output projector's parameters), 6·P_in per input medium
    denoising  per signal block of a modality with a gen_<modality> weight (model/denoising.py): the frozen VAE's
               encoder on the target (no grad) + the frozen UNet's forward + its backward to the conditioning
               (activation gradients only), counted by torch's FlopCounterMode on a meta-device copy of the
               decoder (its folder's configs; SD-1.5's at 64x64 latents when the image folder is not here)
The LLM shape is Vicuna-7B's (--shape 7b, default), 13B's, or the configured LLM's config.json (--shape config).

Memory per GPU (ZeRO stage from the DeepSpeed JSON, default code/dsconfig/stage_<N>.json):
    weights    frozen LLM in bf16 (int8 / nf4 with model.quantization), /world with ZeRO-3
    trainable  bf16 weights + fp32 gradients (/world from ZeRO-2) + fp32 master and Adam m, v (/world from ZeRO-1;
               on the CPU with offload_optimizer)
    activations per micro-batch at the longest sample: 34·d bytes per token and layer for the tokens with
               gradients (Korthikanti et al. 2022, 16-bit, flash/SDPA attention; an upper bound: PyTorch saves less
               for frozen linears), the no-grad prefix's KV cache 4·d·layers bytes per token, fp32 logits and
               their gradient 8·V bytes per token.
    decoders   with denoising terms: the frozen UNet + VAE in bf16 on every GPU, and the tensors the UNet saves
               for its backward per block (measured on the meta device: its attention saves the probabilities as
               the math kernel does, an upper bound where flash attention runs)

Suffix backward is counted where NextGPT.forward would use it on a GPU: model/suffix.worth_splitting, a roofline
of the LLM passes at the configured micro-batch (at micro-batch 1 every pass only reads weights, and three passes
lose to two). Predicted samples/s per GPU = the lower of peak x MFU / FLOPs per sample (MFU here counts the FLOPs
actually run) and micro-batch / (LLM passes x weight bytes / memory bandwidth); epoch time =
samples in one epoch of the configured datasets / (samples/s per GPU x GPUs). Padding is not counted (group_by_length
keeps it under 10%, make bench).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# bf16 dense peak FLOP/s, memory (GB) and memory bandwidth (B/s) per GPU (vendor data sheets, SXM unless named)
GPUS = {"H100": (989.4e12, 80, 3.35e12), "H100-PCIe": (756.0e12, 80, 2.0e12), "H200": (989.4e12, 141, 4.8e12),
        "A100-80GB": (312.0e12, 80, 2.04e12), "A100-40GB": (312.0e12, 40, 1.56e12)}
SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000),
          "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      vocab_size=32000)}
NEW_TOKENS = 38
BYTES = {"none": 2.0, "8bit": 1.0, "4bit": 0.5}
# SD-1.5's UNet is UNet2DConditionModel's defaults with 768-wide text conditioning, 64x64 latents (512 px); its VAE
# 4 levels of 128-512 channels. Used for the image term when the configured folder is not here (the 7B estimate).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=512)


@dataclass
class Shape:
    d: int
    ffn: int
    layers: int
    vocab: int

    @property
    def layer_params(self) -> int:
        return 4 * self.d * self.d + 3 * self.d * self.ffn + 2 * self.d     # q k v o, gate up down, 2 norms

    @property
    def flop_params(self) -> int:                                            # N: without the input embedding
        return self.layers * self.layer_params + self.d + self.vocab * self.d

    @property
    def total_params(self) -> int:
        return self.flop_params + self.vocab * self.d


def llm_shape(cfg, name: str) -> Shape:
    if name == "config":
        path = Path(cfg.path(cfg.model.llm)) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no LLM config.json (use --shape 7b or 13b)")
        raw = json.loads(path.read_text())
    else:
        raw = SHAPES[name]
    return Shape(raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], raw["vocab_size"] + NEW_TOKENS)


def projector_params(cfg, d: int) -> dict[str, int]:
    """Output projector parameters per modality (built on the meta device from the real module code)."""
    import torch

    from nextgpt.modalities import MODALITIES
    from nextgpt.model.projectors import build_output_proj

    out = {}
    for m in cfg.model.modalities:
        with torch.device("meta"):
            module = build_output_proj(cfg.model.output_proj.mode, d, MODALITIES[m].num_signal_tokens,
                                       conditioning(cfg, m), cfg.model.output_proj)
        out[m] = sum(p.numel() for p in module.parameters())
    return out


def conditioning(cfg, modality: str) -> tuple[int, int]:
    """(T, D) of the configured decoder, or the original decoders' when the folder is not here."""
    from nextgpt.modalities import conditioning_shape

    folder = Path(cfg.path(cfg.model.decoders.get(modality, "")))
    if folder.is_dir():
        return conditioning_shape(modality, folder)
    return {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}[modality]


def denoising_costs(cfg) -> dict[str, dict]:
    """{modality: UNet forward / backward and VAE-encoder FLOPs per block, frozen decoder parameters, bytes the UNet
    saves for its backward} for every modality with a gen_<modality> weight, from a bf16 meta-device copy of the
    decoder at cfg.inference's sizes (nothing is allocated). A modality whose folder is not here: SD-1.5 for the
    image, else an error naming the folder."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nextgpt.io import read_json
    from nextgpt.modalities import MODALITIES
    from nextgpt.model.denoising import latent_geometry

    out = {}
    for modality in cfg.model.modalities:
        if not cfg.train.loss_weights.get(MODALITIES[modality].generation_loss_key, 0.0):
            continue
        folder = Path(cfg.path(cfg.model.decoders.get(modality, "")))
        if (folder / "unet" / "config.json").is_file():
            unet_config = read_json(folder / "unet" / "config.json")
            vae_config = read_json(folder / "vae" / "config.json")
            vocoder = read_json(folder / "vocoder" / "config.json") if modality == "audio" else None
        elif modality == "image":
            unet_config, vae_config, vocoder = SD15_UNET, SD15_VAE, None
        else:
            raise FileNotFoundError(f"{folder}: no {modality} decoder here to size gen_{modality} from")
        unet_class = diffusers.UNet3DConditionModel if modality == "video" else diffusers.UNet2DConditionModel
        with torch.device("meta"):
            unet = unet_class.from_config(unet_config).to(torch.bfloat16).requires_grad_(False)
            vae = diffusers.AutoencoderKL.from_config(vae_config).to(torch.bfloat16).requires_grad_(False)
        full = {**unet.config, **unet_config}
        geometry = latent_geometry(modality, dict(vae.config), full, vocoder, cfg.inference.decoding(modality),
                                   str(folder))
        tokens, dim = conditioning(cfg, modality)
        meta = dict(device="meta", dtype=torch.bfloat16)
        latents = torch.empty(1, *geometry.latent, **meta)
        condition = torch.empty(1, dim if MODALITIES[modality].pooled else tokens, *(() if MODALITIES[modality].pooled
                                                                                   else (dim,)), **meta)
        condition.requires_grad_(True)
        inputs = (dict(encoder_hidden_states=None, class_labels=condition) if MODALITIES[modality].pooled
                  else dict(encoder_hidden_states=condition))
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                prediction = unet(latents, torch.zeros(1, dtype=torch.long, device="meta"), **inputs).sample
            forward = counter.get_total_flops()
            prediction.float().pow(2).mean().backward()
            backward = counter.get_total_flops() - forward
        frames = geometry.frames if modality == "video" else 1
        media = torch.empty(frames, vae.config.in_channels, geometry.height, geometry.width, **meta)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.encode(media)
        out[modality] = dict(unet_forward=forward, unet_backward=backward, vae_encode=counter.get_total_flops(),
                             params=sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in vae.parameters()),
                             saved_bytes=saved[0], latent=list(geometry.latent),
                             source=str(folder) if (folder / "unet").is_dir() else "SD-1.5 (built in)")
    return out


def trainable_counts(cfg, shape: Shape, projectors: dict[str, int]) -> dict[str, int]:
    trainable = set(cfg.train.trainable)
    lora = cfg.model.lora
    per_module = {"q_proj": 2 * shape.d, "k_proj": 2 * shape.d, "v_proj": 2 * shape.d, "o_proj": 2 * shape.d,
                  "gate_proj": shape.d + shape.ffn, "up_proj": shape.d + shape.ffn, "down_proj": shape.d + shape.ffn}
    counts = {
        "input_proj": (1024 * shape.d + shape.d) if "input_proj" in trainable else 0,
        "output_proj": sum(projectors.values()) if "output_proj" in trainable else 0,
        "lora": shape.layers * lora.r * sum(per_module.get(t, 2 * shape.d) for t in lora.target_modules)
        if "lora" in trainable and lora.enabled else 0,
        "token_rows": {"new": 2 * NEW_TOKENS * shape.d, "all": 2 * shape.vocab * shape.d, "none": 0}[cfg.train.token_rows],
    }
    counts["total"] = sum(counts.values())
    return counts


def sample_stats(cfg, tokenizer_path: str | None, max_records: int):
    """-> per dataset: (records, [(T, G, prefix, blocks[(modality, K)], media)]) from the real template."""
    import torch

    from nextgpt.data.conversation import EncodeError
    from nextgpt.data.dataset import build_datasets
    from nextgpt.model import suffix
    from nextgpt.tokens import load_tokenizer

    tokenizer, token_ids = load_tokenizer(tokenizer_path or cfg.path(cfg.model.llm))
    datasets = build_datasets(cfg, tokenizer, token_ids, log=lambda message: None)
    trainable = set(cfg.train.trainable)
    body_trains = "lora" in trainable and cfg.model.lora.enabled
    split_on = cfg.train.suffix_backward and not body_trains and not cfg.model.gradient_checkpointing
    rule = (cfg.train.token_rows == "all", set(token_ids.new_token_ids) if cfg.train.token_rows == "new" else set(),
            "input_proj" in trainable)
    out = {}
    for name, dataset in datasets.items():
        n = len(dataset.samples)
        picks = sorted({int(i * n / max_records) for i in range(max_records)}) if n > max_records else range(n)
        rows = []
        for i in picks:
            from nextgpt.data.conversation import encode

            try:
                enc = encode(dataset.samples[i], tokenizer, token_ids, cfg.model.max_length, prompt=cfg.train.prompt)
            except EncodeError:
                continue                                     # the dataset skips these too
            length = len(enc.input_ids)
            blocks = enc.signal_blocks or []
            prefix = 0
            if split_on:
                prefix = suffix.split_points(torch.tensor([enc.input_ids]), [length],
                                             torch.tensor([[0, p] for p in enc.media_positions]).reshape(-1, 2),
                                             {m: [(0, s)] for m, s in blocks}, rule)[0]
            rows.append((length, length - prefix, prefix, [m for m, _ in blocks], len(enc.media_positions)))
        if not rows:
            raise ValueError(f"dataset {name}: no record encodes within model.max_length {cfg.model.max_length}")
        out[name] = (n, rows)
    return out


def flops_per_sample(row, shape: Shape, counts, projectors, cfg, denoise=None) -> dict[str, float]:
    from nextgpt.modalities import MODALITIES

    length, grad, prefix, blocks, media = row
    n, d, layers = shape.flop_params, shape.d, shape.layers
    context = lambda first, last: (last * (last + 1) - first * (first + 1)) / 2   # Σ ctx(q) for q in [first, last)
    attention = 4 * d * layers * context(0, length)
    attention_grad = 4 * d * layers * context(prefix, length)
    forward = 2 * n * length + attention
    backward = 2 * n * grad + 2 * attention_grad + 2 * counts["lora"] * grad
    if cfg.model.gradient_checkpointing:
        backward += 2 * n * grad + attention_grad
    project = sum(6 * projectors[m] * (MODALITIES[m].num_signal_tokens + conditioning(cfg, m)[0]) for m in blocks
                  if m in projectors) + 6 * counts["input_proj"] * media
    costs = denoise or {}
    decoders = sum(costs[m]["unet_forward"] + costs[m]["unet_backward"] + costs[m]["vae_encode"] for m in blocks
                   if m in costs)
    return {"forward": forward, "backward": backward, "projectors": project, "denoising": decoders,
            "total": forward + backward + project + decoders}


def memory_per_gpu(cfg, shape: Shape, counts, ds_config: dict, world: int, micro: int, longest, gb=2**30,
                   denoise=None) -> dict:
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    offload = bool(ds_config.get("zero_optimization", {}).get("offload_optimizer"))
    trainable = counts["total"]
    frozen = shape.total_params - counts["token_rows"] * (cfg.train.token_rows == "all")
    weights = frozen * BYTES.get(cfg.model.quantization, 2.0) / (world if zero == 3 else 1)
    states = 12 * trainable / (world if zero >= 1 else 1) * (0 if offload else 1)      # fp32 master + Adam m, v
    grads = 4 * trainable / (world if zero >= 2 else 1)
    own = 2 * trainable / (world if zero == 3 else 1)
    length, grad, prefix = longest
    activations = micro * (34 * shape.d * shape.layers * grad + 4 * shape.d * shape.layers * prefix
                           + 8 * shape.vocab * length)
    parts = {"LLM weights": weights, "trainable weights": own, "gradients": grads, "optimizer states": states,
             "activations": activations}
    if denoise:     # frozen UNet + VAE in bf16 (outside the engine: not partitioned); a micro-batch of the largest
        parts["decoder weights"] = 2 * sum(c["params"] for c in denoise.values())
        parts["decoder activations"] = micro * max(c["saved_bytes"] for c in denoise.values())
    return {k: v / gb for k, v in parts.items()} | {"total": sum(parts.values()) / gb, "zero": zero,
                                                      "offload": offload}


def run(args) -> dict:
    from nextgpt import config as config_module

    cfg = config_module.load(args.config, args.overrides)
    shape = llm_shape(cfg, args.shape)
    projectors = projector_params(cfg, shape.d)
    counts = trainable_counts(cfg, shape, projectors)
    ds_path = Path(args.ds_config) if args.ds_config else REPO / "code" / "dsconfig" / f"stage_{cfg.train.stage}.json"
    from nextgpt.io import read_json

    ds_config = read_json(ds_path)
    stats = sample_stats(cfg, args.tokenizer, args.max_records)
    denoise = denoising_costs(cfg)

    records = sum(n for n, _ in stats.values())
    rows = [r for _, rs in stats.values() for r in rs]
    micro = cfg.train.micro_batch_size
    # NextGPT.forward on a GPU splits only where the roofline says it pays (model/suffix.worth_splitting)
    from nextgpt.model import suffix

    mean_length = round(sum(r[0] for r in rows) / len(rows))
    mean_prefix = round(sum(r[2] for r in rows) / len(rows))
    split_used = mean_prefix > 0 and suffix.worth_splitting(micro, mean_length, [mean_prefix] * micro,
                                                            [mean_length] * micro)
    if not split_used:
        rows = [(r[0], r[0], 0, r[3], r[4]) for r in rows]
    passes = (3 if split_used else 2) + (1 if cfg.model.gradient_checkpointing else 0)
    weights = [n / len(rs) for n, rs in stats.values() for _ in rs]            # each dataset by its record count
    mean = lambda f: sum(w * f(r) for w, r in zip(weights, rows)) / sum(weights)
    flops = {k: mean(lambda r: flops_per_sample(r, shape, counts, projectors, cfg, denoise)[k])
             for k in ("forward", "backward", "projectors", "denoising", "total")}
    tokens = mean(lambda r: r[0])
    grad_tokens = mean(lambda r: r[1])
    bare = 4 * shape.flop_params * tokens
    longest = max(rows, key=lambda r: (r[0], r[1]))
    memory = memory_per_gpu(cfg, shape, counts, ds_config, args.gpus, cfg.train.micro_batch_size, longest[:3],
                            denoise=denoise)

    print(f"stage {cfg.train.stage} ({args.config}), LLM shape {args.shape}: d {shape.d}, {shape.layers} layers, "
          f"N = {shape.flop_params / 1e9:.2f} B (without the input embedding), vocab {shape.vocab}")
    print(f"trainable: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"data: {records:,} records in {len(stats)} dataset(s) ({', '.join(stats)}), {len(rows)} encoded for the "
          f"token counts; suffix backward {'used' if split_used else 'not used'} (train.suffix_backward "
          f"{cfg.train.suffix_backward}, micro-batch {micro}: GPU roofline of the passes)")
    print(f"tokens per sample {tokens:.1f} (longest {longest[0]}), with gradients {grad_tokens:.1f}")
    print(f"FLOPs per sample: forward {flops['forward'] / 1e12:.3f} T, backward {flops['backward'] / 1e12:.3f} T, "
          f"projectors {flops['projectors'] / 1e12:.4f} T, denoising {flops['denoising'] / 1e12:.3f} T, "
          f"total {flops['total'] / 1e12:.3f} T ({flops['total'] / bare:.2f} x the 4·N·T of a full backward)")
    for modality, c in denoise.items():
        print(f"  gen_{modality} ({c['source']}, latents {tuple(c['latent'])}): per block UNet forward "
              f"{c['unet_forward'] / 1e12:.3f} T + backward {c['unet_backward'] / 1e12:.3f} T + VAE encode "
              f"{c['vae_encode'] / 1e12:.3f} T; frozen UNet + VAE {c['params'] / 1e6:.0f} M parameters; saved for "
              f"the backward {c['saved_bytes'] / 2**30:.2f} GiB (math attention: an upper bound)")
    print(f"memory per GPU (ZeRO-{memory['zero']}{', optimizer offload' if memory['offload'] else ''}, "
          f"{args.gpus} GPUs, micro-batch {cfg.train.micro_batch_size}): " +
          ", ".join(f"{k} {memory[k]:.2f}" for k in ("LLM weights", "trainable weights", "gradients",
                                                    "optimizer states", "activations", "decoder weights",
                                                    "decoder activations") if k in memory) +
          f" -> {memory['total']:.1f} GiB")
    table = []
    weight_bytes = shape.total_params * BYTES.get(cfg.model.quantization, 2.0)
    # the UNet's forward and backward and the VAE encoder read the decoder weights too, on samples with a block
    with_block = mean(lambda r: float(any(m in denoise for m in r[3])))
    decoder_reads = sum(2 * 2 * c["params"] for c in denoise.values()) * with_block / max(len(denoise), 1)
    for gpu in dict.fromkeys(["H100", "A100-80GB", args.gpu]):
        peak, capacity, bandwidth = GPUS[gpu]
        # FLOP-bound rate, or (small micro-batches) the rate of reading the weights once per LLM pass
        compute_bound = peak * args.mfu / flops["total"]
        weight_bound = micro / ((passes * weight_bytes + micro * decoder_reads) / bandwidth)
        per_gpu = min(compute_bound, weight_bound)
        epoch = records / (per_gpu * args.gpus)
        table.append(dict(gpu=gpu, peak_tflops=peak / 1e12, mfu=args.mfu, samples_per_s_per_gpu=per_gpu,
                          bound="weights" if weight_bound < compute_bound else "FLOPs",
                          tokens_per_s_per_gpu=per_gpu * tokens, epoch_hours=epoch / 3600,
                          fits=memory["total"] <= capacity * 0.9))
        print(f"  {gpu:<10} peak {peak / 1e12:6.1f} TFLOP/s x MFU {args.mfu:.2f}: {per_gpu:8.1f} samples/s/GPU, "
              f"{per_gpu * tokens:9.0f} tokens/s/GPU ({'weight-read' if weight_bound < compute_bound else 'FLOP'}-"
              f"bound); one epoch on {args.gpus} GPUs {epoch / 3600:.3g} h; "
              f"memory {'fits' if memory['total'] <= capacity * 0.9 else 'DOES NOT FIT'} in {capacity} GB")
    result = dict(config=str(args.config), stage=cfg.train.stage, shape=args.shape, flop_params=shape.flop_params,
                  trainable=counts, records=records, tokens_per_sample=tokens, grad_tokens_per_sample=grad_tokens,
                  flops_per_sample=flops, full_backward_ratio=flops["total"] / bare, memory_gib=memory,
                  denoising=denoise,
                  suffix_backward_used=split_used, micro_batch_size=micro,
                  gpus=args.gpus, predictions=table)
    if args.json:
        from nextgpt.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage YAML, as for train.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ds_config", help="DeepSpeed JSON (default code/dsconfig/stage_<N>.json)")
    p.add_argument("--shape", default="7b", choices=["7b", "13b", "config"], help="LLM shape (config: model.llm's)")
    p.add_argument("--tokenizer", help="count tokens with this tokenizer folder instead of model.llm's")
    p.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation to assume (0-1)")
    p.add_argument("--max-records", type=int, default=2000, help="records encoded per dataset for the token counts")
    p.add_argument("--json", help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    from nextgpt import cli

    args = parser().parse_args(argv)
    if not 0 < args.mfu <= 1 or args.gpus < 1 or args.max_records < 1:
        print("error: --mfu must be in (0, 1], --gpus and --max-records >= 1", file=sys.stderr)
        return 2
    def body() -> int:
        run(args)
        return 0

    return cli.run(body, "estimate")


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "estimate"))
