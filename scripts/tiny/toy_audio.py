"""The tiny AudioLDM's spectrogram and vocoder: a log-frequency filterbank and its exact inverse.

The 32 "mel" bins are 1/6-octave bands from 110 Hz (the toy pitches 220 / 440 / 880 Hz and the octave sweeps fall
on bins 6, 12, 18, 24), one frame per 50 ms (hop 800 at 16 kHz). A frame holds the amplitude of each band, so
`spectrogram(wave)` is what the VAE and UNet learn and `build_vocoder()` a SpeechT5HifiGan whose weights are set, not
trained: conv_pre copies the bands, its one transposed convolution adds a Hann-windowed sine per band and frame
(50% overlap: the windows sum to one, and the bands at multiples of 20 Hz keep their phase across frames), the
residual blocks are zero (identity) and conv_post reads the waveform back out of the leaky ReLUs.
"""

from __future__ import annotations

import math

import numpy as np

RATE = 16000
HOP = 800                    # samples per frame: 20 frames per second
WINDOW = 2 * HOP             # Hann window, 50% overlap
BINS = 32
LOWEST = 110.0               # Hz; bin k is LOWEST * 2 ** (k / BINS_PER_OCTAVE)
BINS_PER_OCTAVE = 6
N_FFT = 4 * WINDOW
# The pipeline's "mel" (what the VAE decodes and the vocoder reads) is 4 * amplitude - 1: toy tones (amplitude <= 0.5)
# span [-1, 1] like the images the VAE's architecture expects.
SCALE, OFFSET = 4.0, -1.0


def to_mel(amplitudes):
    return amplitudes * SCALE + OFFSET


def bin_frequencies() -> np.ndarray:
    return LOWEST * 2.0 ** (np.arange(BINS) / BINS_PER_OCTAVE)


def _hann() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)      # periodic: shifted copies sum to 1


def spectrogram(wave: np.ndarray) -> np.ndarray:
    """(N,) float waveform at 16 kHz -> (N // HOP, BINS) band amplitudes (a sine of amplitude A at a bin -> A)."""
    wave = np.asarray(wave, dtype=np.float64)
    frames = len(wave) // HOP
    padded = np.pad(wave, (HOP, HOP + WINDOW))
    # frame n covers samples n*HOP - HOP/2 ... as the vocoder's transposed convolution places its window
    starts = np.arange(frames) * HOP + HOP - HOP // 2
    segments = np.stack([padded[s:s + WINDOW] for s in starts]) * _hann()
    magnitude = np.abs(np.fft.rfft(segments, n=N_FFT, axis=1)) / (WINDOW / 4)   # a sine of amplitude A -> A
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    # triangular bands in log frequency; each band reads the strongest FFT bin under its triangle
    distance = np.abs(np.log2(np.maximum(freqs, 1.0))[None, :] - np.log2(bin_frequencies())[:, None])
    weights = np.maximum(0.0, 1.0 - distance * BINS_PER_OCTAVE)                # (BINS, F)
    return (magnitude[:, None, :] * weights[None]).max(axis=2).astype(np.float32)


def vocoder_config():
    from transformers import SpeechT5HifiGanConfig

    return SpeechT5HifiGanConfig(model_in_dim=BINS, sampling_rate=RATE, upsample_initial_channel=BINS,
                                 upsample_rates=[HOP], upsample_kernel_sizes=[WINDOW], resblock_kernel_sizes=[1],
                                 resblock_dilation_sizes=[[1]], normalize_before=False, leaky_relu_slope=0.1)


def build_vocoder():
    """SpeechT5HifiGan: (B, frames, BINS) band amplitudes -> (B, frames * HOP) waveform, weights set exactly."""
    import torch
    from transformers import SpeechT5HifiGan

    vocoder = SpeechT5HifiGan(vocoder_config()).eval()
    slope = vocoder.config.leaky_relu_slope
    with torch.no_grad():
        for p in vocoder.parameters():
            p.zero_()
        # centre tap: band k -> channel k, undoing to_mel
        vocoder.conv_pre.weight[:, :, 3] = torch.eye(BINS) / SCALE
        vocoder.conv_pre.bias[:] = -OFFSET / SCALE
        # ConvTranspose1d weight (in=BINS, out=BINS // 2, WINDOW): channel 0 the waveform, channel 1 its negative
        tau = np.arange(WINDOW) - HOP // 2                                     # sample offset of the window start
        kernels = _hann()[None, :] * np.sin(2 * np.pi * bin_frequencies()[:, None] * tau[None, :] / RATE)
        kernels = torch.tensor(kernels, dtype=torch.float32)
        upsampler = vocoder.upsampler[0]
        upsampler.weight[:, 0, :] = kernels
        upsampler.weight[:, 1, :] = -kernels
        # leaky_relu(x) - leaky_relu(-x) = (1 + slope) x: the waveform back, sign and all
        vocoder.conv_post.weight[0, 0, 3] = 1.0 / (1.0 + slope)
        vocoder.conv_post.weight[0, 1, 3] = -1.0 / (1.0 + slope)
    return vocoder
