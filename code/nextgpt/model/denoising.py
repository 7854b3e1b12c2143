"""The denoising loss through the frozen decoder (train.loss_weights gen_image / gen_video / gen_audio).

NExT-GPT's 2024 code (reference §8 "Losses"), MetaQuery and OpenUni train the connector on the decoder's own loss:

    target medium --decoder VAE (no_grad)--> latents x0 (n, C, h, w) | video (n, C, F, h, w) | audio (n, C, T', M')
    one timestep t and one noise draw per target, from a generator seeded by (train.seed, step, target)
    x_t = scheduler.add_noise(x0, noise, t)
    output_proj[modality] conditioning (n, T, D) --frozen UNet(x_t, t, conditioning)--> prediction, same shape as x0
        image / video: encoder_hidden_states = conditioning (n, 77, D)
        audio (AudioLDM): class_labels = conditioning (n, D), encoder_hidden_states = None
    target = noise (epsilon) | scheduler.get_velocity(x0, noise, t) (v_prediction), read from the scheduler config
    loss = mean over targets of w(t) * mean((prediction - target)^2),
        w(t) = min(SNR(t), gamma) / SNR(t) (epsilon) | min(SNR(t), gamma) / (SNR(t) + 1) (v_prediction); gamma 0: 1

The UNet and VAE are frozen (requires_grad False, eval) and held beside the model, not as submodules, so they stay
out of DeepSpeed's parameter groups, checkpoints and trainable counts. The VAE runs under no_grad; the UNet runs
with autograd on so that the gradient reaches the conditioning and, through it, output_proj (its own weights need
no gradient: only activation gradients are computed).

The noise is keyed by the target (its sample's file and record, its block) and the step, not drawn from a running
random stream: a resumed run draws exactly what the uninterrupted one drew, and a target gets the same draw
whichever rank or micro-batch holds it (so N ranks equal one process over the same global batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nextgpt.modalities import get

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOG_MEL_FLOOR = 1e-5          # AudioLDM's dynamic-range compression: log(clamp(mel, 1e-5))


def generator_for(seed: int, step: int, key: int) -> torch.Generator:
    """A CPU generator for one target (key: collate's target_keys) at one step: the same numbers on every device,
    rank and resume."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(step) % 2**32, int(key) % 2**32]).generate_state(2)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class LatentGeometry:
    """What the decoder makes at inference (cfg.inference.<modality>), in its latent space."""
    height: int                 # pixels (image, video) or mel frames (audio)
    width: int                  # pixels or mel bins
    frames: int = 1             # video frames
    latent: tuple = ()          # latent shape of one target (C, h, w) | (C, F, h, w)
    vae_scale: int = 8          # 2 ** (VAE levels - 1)
    hop: int = 0                # audio: samples per mel frame (the vocoder's upsampling)
    sample_rate: int = 0        # audio: the vocoder's rate


def latent_geometry(modality: str, vae: dict, unet: dict, vocoder: dict | None, settings, where: str) -> LatentGeometry:
    """Sizes from the inference settings and the decoder's configs (vae / unet / vocoder config.json values); a
    size the VAE cannot halve down, or a UNet that does not take the VAE's latents, is an error naming `where`.
    scripts/estimate.py sizes the 7B run's UNet term with it too."""
    channels = int(vae["latent_channels"])
    if int(unet["in_channels"]) != channels or int(unet["out_channels"]) != channels:
        raise ValueError(f"{where}: the UNet takes {unet['in_channels']} channels, the VAE makes {channels} latent "
                         "channels")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    hop = rate = 0
    if modality == "audio":
        for key in ("upsample_rates", "sampling_rate", "model_in_dim"):
            if key not in (vocoder or {}):
                raise ValueError(f"{where}: vocoder/config.json has no {key}")
        hop, rate = int(np.prod(vocoder["upsample_rates"])), int(vocoder["sampling_rate"])
        # AudioLDMPipeline: height = seconds / (hop / rate) mel frames, rounded up to the VAE factor
        frames = math.ceil(int(settings.seconds * rate / hop) / scale) * scale
        height, width, count = frames, int(vocoder["model_in_dim"]), 1
    else:
        height, width = int(settings.height), int(settings.width)
        count = int(settings.frames) if modality == "video" else 1
    if height % scale or width % scale:
        raise ValueError(f"{where}: target size {height}x{width} is not a multiple of the VAE factor {scale}")
    spatial = (height // scale, width // scale)
    latent = (channels, count, *spatial) if modality == "video" else (channels, *spatial)
    return LatentGeometry(height, width, count, latent, scale, hop, rate)


class DecoderLoss:
    """The frozen UNet + VAE + training noise scheduler of one decoder folder, and its denoising loss."""

    def __init__(self, modality: str, folder: str | Path, settings, device, dtype: torch.dtype = torch.float32):
        try:
            import diffusers
        except ImportError as e:
            raise ImportError(f"the denoising loss needs diffusers ({e}); run `make env`") from None
        self.modality, self.folder = modality, Path(folder)
        self.info = get(modality)
        self.device, self.dtype = torch.device(device), dtype
        where = f"{self.folder} ({modality} decoder, train.loss_weights.gen_{modality})"
        if not (self.folder / "model_index.json").is_file():
            raise ValueError(f"{where}: no model_index.json (not a diffusers pipeline folder)")
        # The training scheduler: DDPM over the folder's own schedule (betas, timesteps, prediction type), as
        # diffusers' training scripts do; the folder's PNDM / DDIM config carries the same schedule fields.
        try:
            self.scheduler = diffusers.DDPMScheduler.from_pretrained(str(self.folder), subfolder="scheduler")
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: no usable noise scheduler ({str(e).splitlines()[0]})") from None
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{where}: scheduler prediction_type {self.prediction_type!r}; the denoising loss "
                             f"supports {', '.join(PREDICTION_TYPES)}")
        unet_class = diffusers.UNet3DConditionModel if modality == "video" else diffusers.UNet2DConditionModel
        try:
            self.vae = diffusers.AutoencoderKL.from_pretrained(str(self.folder), subfolder="vae", dtype=dtype)
            self.unet = unet_class.from_pretrained(str(self.folder), subfolder="unet", dtype=dtype)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: cannot load its UNet / VAE ({str(e).splitlines()[0]})") from None
        for module in (self.vae, self.unet):
            module.requires_grad_(False).eval().to(self.device)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        vocoder = None
        if modality == "audio":
            from nextgpt.io import read_json

            vocoder = read_json(self.folder / "vocoder" / "config.json", f"missing ({where} needs its vocoder's "
                                                                         "mel settings)")
        self.geometry = latent_geometry(modality, dict(self.vae.config), dict(self.unet.config), vocoder, settings,
                                        where)
        self.vae_scale = self.geometry.vae_scale

    # -- targets ------------------------------------------------------------------------------------------------------
    def pixels(self, path: str) -> torch.Tensor:
        """One target medium as the VAE's input: image (3, H, W) / video (F, 3, H, W) in [-1, 1];
        audio (1, frames, mel bins) log-mel."""
        from nextgpt.imagebind.preprocess import MediaError

        geometry = self.geometry
        try:
            if self.modality == "image":
                return self._image(path, geometry)
            if self.modality == "video":
                return self._video(path, geometry)
            return self._audio(path, geometry)
        except MediaError:
            raise
        except (OSError, ValueError) as e:
            raise MediaError(f"{path}: cannot read the {self.modality} target ({str(e).splitlines()[0]})") from None

    def _image(self, path: str, geometry: LatentGeometry) -> torch.Tensor:
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        from nextgpt.imagebind.preprocess import to_rgb

        with Image.open(path) as image:
            image = to_rgb(image)
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        return processor.preprocess(image, geometry.height, geometry.width, resize_mode="crop")[0]   # (3, H, W)

    def _video(self, path: str, geometry: LatentGeometry) -> torch.Tensor:
        import av
        from diffusers.video_processor import VideoProcessor

        with av.open(str(path)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
        if not frames:
            raise ValueError("no video frames")
        # `frames` frames evenly over the clip (the generated clip's length), repeating frames of a shorter clip
        picks = np.linspace(0, len(frames) - 1, geometry.frames).round().astype(int)
        processor = VideoProcessor(vae_scale_factor=self.vae_scale)
        clip = processor.preprocess_video([[frames[i] for i in picks]], geometry.height, geometry.width)
        return clip[0].permute(1, 0, 2, 3)                                      # (1, 3, F, H, W) -> (F, 3, H, W)

    def _audio(self, path: str, geometry: LatentGeometry) -> torch.Tensor:
        """AudioLDM's mel (its vocoder inverts it): |STFT| (Hann, n_fft = window = 4 hops rounded up to a power of
        two: 1024 at hop 160) -> Slaney mel filters 0..rate/2 -> log(clamp(., 1e-5)); (1, frames, mel bins), cut or
        padded with silence to the generated length."""
        from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

        from nextgpt.imagebind.preprocess_audio import decode_audio, resample

        samples, rate = decode_audio(path)                                        # (N, channels)
        waveform = resample(samples.mean(axis=1).astype(np.float32), rate, geometry.sample_rate)
        n_fft = 1 << math.ceil(math.log2(4 * geometry.hop))
        filters = mel_filter_bank(n_fft // 2 + 1, geometry.width, 0.0, geometry.sample_rate / 2, geometry.sample_rate,
                                  norm="slaney", mel_scale="slaney")
        mel = spectrogram(waveform, window_function(n_fft, "hann"), frame_length=n_fft, hop_length=geometry.hop,
                          power=1.0, mel_filters=filters, mel_floor=LOG_MEL_FLOOR)      # (mel bins, frames)
        mel = torch.from_numpy(np.log(np.maximum(mel, LOG_MEL_FLOOR)).T.astype(np.float32))   # (frames, bins)
        if mel.shape[0] >= geometry.height:
            mel = mel[:geometry.height]
        else:
            mel = F.pad(mel, (0, 0, 0, geometry.height - mel.shape[0]), value=math.log(LOG_MEL_FLOOR))
        return mel[None]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One target's VAE input -> scaled latents (C, h, w) | video (C, F, h, w), sampled with `generator`."""
        batch = pixels if self.modality == "video" else pixels[None]              # (F or 1, c, H, W)
        moments = self.vae.encode(batch.to(self.device, self.dtype)).latent_dist
        noise = torch.randn(moments.mean.shape, generator=generator, dtype=moments.mean.dtype).to(self.device)
        latents = (moments.mean + moments.std * noise) * self.scaling_factor
        if self.modality == "video":
            return latents.permute(1, 0, 2, 3)                                    # (F, C, h, w) -> (C, F, h, w)
        return latents[0]

    # -- the loss -----------------------------------------------------------------------------------------------------
    def loss(self, conditioning: torch.Tensor, paths: list[str], generators: list[torch.Generator],
             snr_gamma: float) -> torch.Tensor:
        """conditioning (n, T, D) from output_proj (grad flows back through it); paths / generators: one per row.
        -> the weighted mean squared error (fp32 scalar)."""
        if conditioning.shape[0] != len(paths):
            raise ValueError(f"{self.modality}: {conditioning.shape[0]} signal blocks but {len(paths)} target media")
        latents, noises, steps = [], [], []
        for path, generator in zip(paths, generators):
            x0 = self.latents(self.pixels(path), generator)
            steps.append(int(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=generator)))
            noises.append(torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(self.device))
            latents.append(x0)
        x0, noise = torch.stack(latents), torch.stack(noises)                     # (n, *latent)
        timesteps = torch.tensor(steps, device=self.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, timesteps)
        condition = conditioning.to(self.dtype)
        if self.info.pooled:       # AudioLDM: the CLAP vector through the class embedding, no cross-attention input
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=None,
                                   class_labels=condition.reshape(condition.shape[0], -1)).sample
        else:
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=condition).sample
        per_target = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)   # (n,)
        return (per_target * self.snr_weights(timesteps, snr_gamma)).mean()

    def snr_weights(self, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2303.09556) per timestep, for the scheduler's prediction type; 1 when off.
        SNR 0 (a zero-terminal-SNR schedule's last step): the epsilon weight's limit, 1."""
        if not snr_gamma:
            return torch.ones(timesteps.shape, device=self.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps).float()
        clipped = snr.clamp(max=float(snr_gamma))
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


class Denoising:
    """The DecoderLoss of every modality whose gen_<modality> weight is not 0, loaded once at start."""

    def __init__(self, cfg, device, dtype: torch.dtype = torch.float32):
        self.seed, self.snr_gamma = cfg.train.seed, cfg.train.snr_gamma
        self.losses = {}
        for modality in cfg.model.modalities:
            if cfg.train.loss_weights.get(get(modality).generation_loss_key, 0.0) == 0.0:
                continue
            if not cfg.model.decoders.get(modality):
                raise ValueError(f"train.loss_weights.gen_{modality} is set but model.decoders has no {modality}")
            self.losses[modality] = DecoderLoss(modality, cfg.path(cfg.model.decoders[modality]),
                                                cfg.inference.decoding(modality), device, dtype)

    def __contains__(self, modality: str) -> bool:
        return modality in self.losses

    def __call__(self, modality: str, conditioning: torch.Tensor, batch: dict) -> torch.Tensor:
        """conditioning (n, T, D) of the batch's `modality` blocks (collate order) -> the denoising loss."""
        paths = batch.get("target_paths", {}).get(modality)
        keys = batch.get("target_keys", {}).get(modality)
        if paths is None or keys is None:
            raise ValueError(f"the batch has {modality} signal blocks but no target_paths / target_keys for them "
                             "(batches come from nextgpt.data.collate.Collator)")
        step = int(batch.get("step", 0))          # train.py sets it; evaluation leaves 0: the same draws each time
        generators = [generator_for(self.seed, step, key) for key in keys]
        return self.losses[modality].loss(conditioning, list(paths), generators, self.snr_gamma)


def build(cfg, device, dtype: torch.dtype = torch.float32) -> Denoising | None:
    """The configured denoising losses, or None when every gen_<modality> weight is 0 (nothing is loaded)."""
    if not any(cfg.train.loss_weights.get(get(m).generation_loss_key, 0.0) for m in cfg.model.modalities):
        return None
    return Denoising(cfg, device, dtype)
