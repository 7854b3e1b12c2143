"""ImageBind's audio preprocessing (the original's load_and_transform_audio_data): decode with soundfile / PyAV,
resample to 16 kHz (torchaudio's sinc resampler), Kaldi fbank (128 mel), three normalised 2 s clips.

    load_audio(path) -> (3, 1, 128, 204)       16 kHz, 3 clips of 2 s, Kaldi fbank (128 mel), (x + 4.268) / 9.138

torchaudio does not import beside torch 2.13, so its resampler and Kaldi fbank are written here with the same
arithmetic. Bad files raise preprocess.MediaError naming the file.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import MediaError, _check_file, _first_line, clip_spans, opened

AUDIO_SAMPLE_RATE = 16000
AUDIO_CLIP_SECONDS = 2
AUDIO_CLIPS = 3
AUDIO_MEL_BINS = 128
AUDIO_FRAMES = 204             # a 2 s clip gives 198 fbank frames; right-padded with zeros to 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138


def _mel_scale(freq):
    return 1127.0 * (1.0 + freq / 700.0).log() if isinstance(freq, torch.Tensor) else 1127.0 * math.log(
        1.0 + freq / 700.0)


def mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
              high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters, (num_bins, padded_window // 2) in float32, on the HTK mel scale.

    high_freq <= 0 counts down from Nyquist (Kaldi's convention; 0 means Nyquist). No VTLN warping.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high_freq)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    bin_index = torch.arange(num_bins).unsqueeze(1)                            # (num_bins, 1)
    left = mel_low + bin_index * mel_delta
    center = mel_low + (bin_index + 1.0) * mel_delta
    right = mel_low + (bin_index + 2.0) * mel_delta
    mel = _mel_scale(fft_bin_width * torch.arange(padded_window / 2)).unsqueeze(0)  # (1, padded_window / 2)
    up_slope = (mel - left) / (center - left)
    down_slope = (right - mel) / (right - center)
    return torch.clamp(torch.min(up_slope, down_slope), min=0.0)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = AUDIO_SAMPLE_RATE, num_mel_bins: int = AUDIO_MEL_BINS,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97
                ) -> torch.Tensor:
    """Log mel filterbank energies, (frames, num_mel_bins), as Kaldi / torchaudio.compliance.kaldi.fbank computes
    them with ImageBind's options: hanning window, no dither, no energy term, power spectrum, DC offset removed per
    frame, pre-emphasis 0.97, window padded to a power of two, snip_edges (frames = 1 + (n - 400) // 160).

    `waveform`: (samples,) or (channels, samples); channel 0 is used.
    """
    if waveform.ndim == 2:
        waveform = waveform[0]
    window_shift = int(sample_rate * frame_shift_ms * 0.001)                   # 160 at 16 kHz
    window_size = int(sample_rate * frame_length_ms * 0.001)                   # 400
    padded_window = 1 << (window_size - 1).bit_length()                        # 512
    if waveform.shape[0] < window_size:
        return waveform.new_zeros(0, num_mel_bins)
    num_frames = 1 + (waveform.shape[0] - window_size) // window_shift
    frames = waveform.as_strided((num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)                          # remove DC offset per frame
    # Pre-emphasis with the first sample repeated as its own predecessor.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    window = torch.hann_window(window_size, periodic=False, dtype=waveform.dtype, device=waveform.device)
    frames = F.pad(frames * window, (0, padded_window - window_size))          # (frames, 512)
    power = torch.fft.rfft(frames).abs().pow(2.0)                               # (frames, 257)
    banks = mel_banks(num_mel_bins, padded_window, sample_rate).to(waveform)    # (128, 256)
    banks = F.pad(banks, (0, 1))                                                # Nyquist bin gets weight 0
    energies = power @ banks.T                                                  # (frames, 128)
    return energies.clamp(min=torch.finfo(torch.float32).eps).log()


def waveform_to_melspec(clip: torch.Tensor, target_frames: int = AUDIO_FRAMES, remove_mean: bool = True
                        ) -> torch.Tensor:
    """A 16 kHz clip (samples,) -> (1, 128, target_frames): mean removed (unless the caller did), fbank,
    transposed, zero-padded/cropped. Not yet normalised (this is the fixture's `audio_clip16k_melspec`)."""
    if remove_mean:
        clip = clip - clip.mean()
    spec = kaldi_fbank(clip).transpose(0, 1)                                    # (128, frames)
    missing = target_frames - spec.shape[1]
    spec = F.pad(spec, (0, missing)) if missing > 0 else spec[:, :target_frames]
    return spec.unsqueeze(0)


def _wav_declared_shortfall(path) -> int | None:
    """Bytes that a RIFF/WAVE file's (or shard member's) `data` chunk declares beyond its end (None if not a WAV
    or the size is the streaming placeholder). libsndfile quietly reads what is there, so truncation is checked
    here."""
    size = path.stat().st_size if isinstance(path, Path) else path.size
    with (open(path, "rb") if isinstance(path, Path) else path.open()) as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return None
                return max(0, offset + 8 + chunk_size - size)
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


def decode_audio(path) -> tuple[np.ndarray, int]:
    """Audio file (a path, or a shard member's Blob) -> (samples, channels) float32 in [-1, 1] and its sample rate (soundfile, else PyAV)."""
    import soundfile

    path = _check_file(path)
    shortfall = _wav_declared_shortfall(path)
    if shortfall:
        raise MediaError(f"{path}: truncated WAV ({shortfall} bytes of audio data missing)")
    try:
        samples, sample_rate = soundfile.read(opened(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as sndfile_error:
        try:
            samples, sample_rate = _decode_audio_av(path)
        except MediaError:
            raise MediaError(f"{path}: not readable audio ({_first_line(sndfile_error)})") from None
    if samples.shape[0] == 0:
        raise MediaError(f"{path}: no audio samples")
    return samples, int(sample_rate)


def _decode_audio_av(path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(opened(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            # Planar float keeps every channel as its own row: (channels, n) per frame.
            to_planar = av.AudioResampler(format="fltp")
            chunks = [planar.to_ndarray() for frame in container.decode(stream)
                      for planar in to_planar.resample(frame)]
            chunks += [planar.to_ndarray() for planar in to_planar.resample(None)]
            sample_rate = stream.rate
    except (av.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{path}: unreadable audio ({_first_line(e)})") from None
    if not chunks:
        raise MediaError(f"{path}: no audio frames")
    return np.concatenate(chunks, axis=1).T.astype(np.float32), int(sample_rate)


def _sinc_resample_kernel(orig: int, new: int, dtype: torch.dtype, zero_crossings: int = 6,
                          rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """torchaudio.functional.resample's default kernel (sinc_interp_hann), (new, 1, 2 * width + orig).

    `orig` / `new` are the rates divided by their gcd. Built in `dtype` as torchaudio builds it in the waveform's
    dtype (float32 for audio files): building it in float64 instead moves outputs by ~1e-7, which the log of
    near-silent mel bins magnifies past 1e-5.
    """
    cutoff = min(orig, new) * rolloff                                   # cycles per (1 / gcd) s
    width = math.ceil(zero_crossings * orig / cutoff)
    index = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig          # (1, 1, taps)
    phase = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + index      # (new, 1, taps)
    phase *= cutoff
    phase = phase.clamp_(-zero_crossings, zero_crossings)
    window = torch.cos(phase * math.pi / zero_crossings / 2) ** 2
    phase *= math.pi
    kernel = torch.where(phase == 0, torch.tensor(1.0).to(phase), phase.sin() / phase)
    kernel *= window * (cutoff / orig)
    return kernel, width


def resample(waveform, sample_rate: int, target_rate: int = AUDIO_SAMPLE_RATE):
    """(..., samples) -> (..., ceil(samples * target / rate)) in the input's dtype, every channel.

    The arithmetic of torchaudio.functional.resample with its defaults (the original's resampler: a sinc low-pass
    at 0.99 x the lower Nyquist frequency, Hann-windowed over 6 zero crossings, one polyphase conv1d). Written
    here in torch because torchaudio does not import beside torch 2.13 (libc10_cuda.so), and no generic
    resampler (soxr, scipy's filters) reproduces its numbers: with it the audio pipeline equals the original's on
    every case of a fixture made with the original (7 synthetic wavs, 8 to 48 kHz; measured max difference 0.0).
    A numpy array in gives a numpy array out.
    """
    if isinstance(waveform, np.ndarray):
        return resample(torch.from_numpy(waveform), sample_rate, target_rate).numpy()
    if sample_rate == target_rate:
        return waveform
    divisor = math.gcd(int(sample_rate), int(target_rate))
    orig, new = int(sample_rate) // divisor, int(target_rate) // divisor
    kernel, width = _sinc_resample_kernel(orig, new, waveform.dtype)
    shape = waveform.shape
    rows = waveform.reshape(-1, shape[-1])                                          # (channels, n)
    length = rows.shape[1]
    padded = F.pad(rows, (width, width + orig))
    # (channels, 1, n') * (new, 1, taps) with stride orig -> (channels, new, n / orig): phase-major, interleave
    out = F.conv1d(padded[:, None], kernel, stride=orig).transpose(1, 2).reshape(rows.shape[0], -1)
    target_length = math.ceil(new * length / orig)
    return out[:, :target_length].reshape(shape[:-1] + (target_length,))


def audio_transform(waveform: torch.Tensor) -> torch.Tensor:
    """16 kHz waveform (samples,) or (channels, samples) -> (3, 1, 128, 204) normalised clips.

    As the original's waveform2melspec: each clip is a VIEW of the whole waveform and its mean (over all
    channels) is removed IN PLACE, so the shift lands in the waveform and later, overlapping clips see it
    (the original's behaviour, kept for parity). The fbank then uses channel 0. The caller's tensor is not
    modified (we work on a copy).
    """
    waveform = waveform.clone() if waveform.ndim == 2 else waveform[None].clone()    # (channels, samples)
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    clips = []
    for start, end in clip_spans(duration, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        clip = waveform[:, int(start * AUDIO_SAMPLE_RATE):int(end * AUDIO_SAMPLE_RATE)]   # a view
        clip -= clip.mean()
        spec = waveform_to_melspec(clip[0], remove_mean=False)
        clips.append(spec.sub(torch.tensor(AUDIO_MEAN)).div(torch.tensor(AUDIO_STD)))
    return torch.stack(clips)


def load_audio(path) -> torch.Tensor:
    """Audio file -> (3, 1, 128, 204) float32: every channel resampled to 16 kHz, clip means over all channels,
    fbank of channel 0 (the original's load_and_transform_audio_data)."""
    samples, sample_rate = decode_audio(path)
    waveform = resample(torch.from_numpy(np.ascontiguousarray(samples.T)), sample_rate)      # (channels, n)
    if waveform.shape[1] < int(AUDIO_SAMPLE_RATE * 0.025):
        raise MediaError(f"{path}: audio too short ({samples.shape[0] / sample_rate * 1000:.1f} ms, need >= 25 ms)")
    return audio_transform(waveform)
