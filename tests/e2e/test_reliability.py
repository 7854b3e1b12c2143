"""Unit tests of the reliability mechanisms: the run lock, the one-line error wrapper, signal handling and the
launcher watch, checkpoint verification with fallback, and the resume config/world-size checks. (`make chaos`
drives the same mechanisms through the real commands.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nextgpt import cli
from nextgpt.checkpoint import resume
from nextgpt.checkpoint import resume_checks
from nextgpt.training import runlock
from nextgpt.training import stop

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- run lock

def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    with runlock.RunLock.acquire(tmp_path / "out", what="training") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["run_id"] == lock.run_id
        with pytest.raises(runlock.RunLockedError, match=rf"another training is using this folder \(pid {os.getpid()}"):
            runlock.RunLock.acquire(tmp_path / "out", what="training")
    assert not (tmp_path / "out" / runlock.LOCK_NAME).exists()
    again = runlock.RunLock.acquire(tmp_path / "out")  # free again after release
    assert again.run_id != lock.run_id
    again.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "out"
    folder.mkdir()
    import socket

    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                         "start_time": 1, "run_id": "old"}))
    lock = runlock.RunLock.acquire(folder)
    assert lock.notes and "stale" in lock.notes[0] and f"pid {dead.pid}" in lock.notes[0]
    assert json.loads(lock.path.read_text())["run_id"] == lock.run_id
    lock.release()


def test_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """Our own (live) pid with another start time = a different process that happens to have that pid now."""
    import socket

    folder = tmp_path / "out"
    folder.mkdir()
    start = runlock.process_start_time(os.getpid())
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                         "start_time": start - 5, "run_id": "old"}))
    runlock.RunLock.acquire(folder).release()


def test_lock_of_another_host_is_not_stolen_and_empty_lock_is_stale(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "run_id": "x"}))
    with pytest.raises(runlock.RunLockedError, match=r"pid 1 on elsewhere.example.*delete .*\.run\.lock"):
        runlock.RunLock.acquire(folder)
    (folder / runlock.LOCK_NAME).write_text("")  # a run killed between creating and writing the lock
    runlock.RunLock.acquire(folder).release()


def test_lock_on_a_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="output path is a file"):
        runlock.RunLock.acquire(tmp_path / "file")


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = runlock.RunLock.acquire(tmp_path)
    lock.path.write_text(json.dumps({"pid": 1, "host": "h", "run_id": "someone else"}))
    lock.release()
    assert lock.path.exists()


# ---------------------------------------------------------------------------------------------- error wrapper

def _fail(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("exc, expected, code", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/delta.safetensors"),
     "no space left on device writing /data/out/delta.safetensors", 2),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "read-only file system: cannot write /ro/out", 2),
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "permission denied: /x/y", 2),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/out"), "/a/file/out: output path", 2),
    (ValueError("train.epochs: must be at least 1"), "train.epochs: must be at least 1", 2),
    (FileNotFoundError("ckpt/x: missing"), "ckpt/x: missing", 2),
    (RuntimeError("CUDA error: device-side assert\nmore\nlines"), "RuntimeError: CUDA error: device-side assert", 2),
    (KeyboardInterrupt(), "interrupted (Ctrl-C)", 130),
    (cli.Interrupted("interrupted at step 3", signal.SIGTERM), "interrupted at step 3", 143),
])
def test_every_failure_is_one_line_with_the_traceback_in_the_log(exc, expected, code, tmp_path, capsys):
    log = tmp_path / "run" / "train.log"

    def body():
        cli.set_log(log)
        raise exc

    assert cli.run(body, "test") == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err
    assert "Traceback (most recent call last)" in log.read_text()
    if isinstance(exc, RuntimeError):
        assert f"(traceback in {log})" in lines[0]


def test_traceback_goes_elsewhere_when_the_log_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def body():
        cli.set_log(blocker / "train.log")  # under a file: cannot be created
        raise RuntimeError("boom")

    assert cli.run(body, "test") == 2
    line = capsys.readouterr().err.strip()
    named = Path(line.split("(traceback in ")[1].rstrip(")"))
    assert named.parent != blocker and "boom" in named.read_text()
    named.unlink()


def test_exit_code_carried_by_the_exception(capsys):
    class Aborted(RuntimeError):
        exit_code = 1

    assert cli.run(_fail(Aborted("too many non-finite losses")), "test") == 1
    assert capsys.readouterr().err.strip() == "error: too many non-finite losses"


# ---------------------------------------------------------------------------------------------- signals

def test_first_signal_sets_the_flag_second_ctrl_c_abandons():
    with stop.StopRequest(watch_launcher=False) as request:
        request.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # SIGTERM then SIGINT (launcher + terminal): still a clean stop
        assert request.signum == signal.SIGTERM
        message = str(request.interrupted(7, "checkpoint-7", "the same command"))
        assert message.startswith("interrupted at step 7 (SIGTERM; saved checkpoint-7); resume with")
    with stop.StopRequest(watch_launcher=False) as request:
        request.arm()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_signal_before_the_loop_interrupts_at_once():
    with stop.StopRequest(watch_launcher=False):
        with pytest.raises(cli.Interrupted, match="before training started") as info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143


def test_rank_stops_when_its_launcher_dies(tmp_path):
    """launcher (python) -> rank (python). SIGKILL the launcher: the rank's watch sees it and stops itself."""
    rank = textwrap.dedent(f"""
        import sys, time
        from nextgpt.training import stop
        stop.POLL_SECONDS = 0.1
        with stop.StopRequest(watch_launcher=True) as request:
            request.arm()
            print("ancestors", len(request.ancestors), flush=True)
            for _ in range(300):
                if request.requested:
                    open({str(tmp_path / 'stopped')!r}, "w").write(request.reason)
                    break
                time.sleep(0.05)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {rank!r}])
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    rank_pid = int(process.stdout.readline())
    time.sleep(1.0)  # the rank records its ancestors
    process.kill()
    process.wait()
    for _ in range(200):
        if (tmp_path / "stopped").exists():
            break
        time.sleep(0.05)
    reason = (tmp_path / "stopped").read_text() if (tmp_path / "stopped").exists() else None
    try:
        os.kill(rank_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Either the watch thread noticed or PR_SET_PDEATHSIG delivered SIGTERM first: both stop the loop.
    assert reason in (f"the launcher (pid {process.pid}) exited", "SIGTERM"), reason


def test_an_exited_unreaped_launcher_stops_the_rank_within_the_step(tmp_path):
    """The issue's case: SIGTERM kills the `deepspeed` runner, whose parent (a supervisor) has not reaped it yet.
    The zombie must count as gone, and `requested` must see it when the loop asks (not a second later)."""
    rank = textwrap.dedent(f"""
        import os, time
        from nextgpt.training import stop
        stop.POLL_SECONDS = 600                      # the watch thread cannot be the one that notices
        with stop.StopRequest(watch_launcher=True) as request:
            request.arm()
            print(len(request.ancestors), os.getppid(), flush=True)
            while not request.requested:
                time.sleep(0.01)                     # one "step"
            open({str(tmp_path / 'stopped')!r}, "w").write(f"{{time.time()}} {{request.reason}}")
    """)
    def parent_of(child: str) -> str:
        return textwrap.dedent(f"""
            import subprocess, sys, time
            p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
            time.sleep(60)
        """)

    # runner (killed) -> launch.py (lives on: PR_SET_PDEATHSIG does not fire) -> rank
    process = subprocess.Popen([sys.executable, "-c", parent_of(parent_of(rank))], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    ancestors, middle = map(int, process.stdout.readline().split())
    assert ancestors >= 2  # the rank sees both launchers (and pytest above them)
    os.kill(process.pid, signal.SIGTERM)             # dies at once (no handler) and stays a zombie: not reaped here
    sent = time.time()
    for _ in range(500):
        if (tmp_path / "stopped").exists():
            break
        time.sleep(0.01)
    assert Path(f"/proc/{process.pid}").exists() and not stop.pid_alive(process.pid)  # still a zombie
    process.wait()
    os.kill(middle, signal.SIGKILL)
    stopped, reason = (tmp_path / "stopped").read_text().split(" ", 1)
    assert reason == f"the launcher (pid {process.pid}) exited"
    assert float(stopped) - sent < 0.5, float(stopped) - sent


# ---------------------------------------------------------------------------------------------- resume checks

def _fake_checkpoint(folder: Path, ranks: int = 1) -> Path:
    from nextgpt.io import sha256_file

    state = folder / "state"
    (state / "deepspeed").mkdir(parents=True)
    (folder / "delta.safetensors").write_bytes(b"delta" * 10)
    (state / "deepspeed" / "optim_states.pt").write_bytes(b"optimizer" * 100)
    for r in range(ranks):
        (state / f"rank_{r}.pt").write_bytes(b"rank state")
    (folder / "meta.json").write_text(json.dumps({"files": {"delta.safetensors": sha256_file(
        folder / "delta.safetensors")}}))
    hashes = {str(p.relative_to(state)): sha256_file(p) for p in resume._state_files(state)}
    (state / resume.STATE_HASHES).write_text(json.dumps({"files": hashes,
                                                         "meta.json": sha256_file(folder / "meta.json")}))
    return folder


def test_corrupt_latest_falls_back_to_the_newest_that_verifies(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "latest").write_text("checkpoint-6\n")
    assert resume_checks.choose(tmp_path, "auto") == (tmp_path / "checkpoint-6", [])
    optimizer = tmp_path / "checkpoint-6" / "state" / "deepspeed" / "optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:50])  # truncated
    (tmp_path / "checkpoint-4" / "state" / "rank_0.pt").unlink()
    chosen, notes = resume_checks.choose(tmp_path, "auto")
    assert chosen == tmp_path / "checkpoint-2"
    assert "skipping checkpoint-6" in notes[0] and "optim_states.pt: sha256 differs" in notes[0]
    assert "skipping checkpoint-4" in notes[1] and "rank_0.pt: listed in sha256.json, missing" in notes[1]
    assert "resuming from checkpoint-2 instead" in notes[-1]
    with pytest.raises(ValueError, match="optim_states.pt: sha256 differs"):
        resume_checks.choose(tmp_path, str(tmp_path / "checkpoint-6"))
    (tmp_path / "checkpoint-6" / "meta.json").unlink()  # meta.json (the delta's hashes) is vouched for too
    assert f"{tmp_path / 'checkpoint-6' / 'meta.json'}: listed in sha256.json, missing" in \
        resume_checks.verify(tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-2" / "delta.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no checkpoint verifies"):
        resume_checks.choose(tmp_path, "auto")


def test_resume_config_changes_are_named_or_allowed(tmp_path):
    import yaml

    folder = _fake_checkpoint(tmp_path / "checkpoint-2")
    saved = {"train": {"lr": 1e-4, "max_steps": 8, "log_every": 1, "output_dir": "a"}, "data": {"num_workers": 0}}
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    same = {"train": {"lr": 1e-4, "max_steps": 8, "log_every": 5, "output_dir": "b"}, "data": {"num_workers": 4}}
    assert resume_checks.check_config(folder, same, allow=False) == []
    changed = {"train": {"lr": 2e-4, "max_steps": 16, "log_every": 1, "output_dir": "a"}, "data": {"num_workers": 0}}
    with pytest.raises(ValueError, match=r"train.lr: 0.0001 -> 0.0002; train.max_steps: 8 -> 16; pass "
                                         r"--allow-config-change"):
        resume_checks.check_config(folder, changed, allow=False)
    assert resume_checks.check_config(folder, changed, allow=True) == ["train.lr: 0.0001 -> 0.0002",
                                                                "train.max_steps: 8 -> 16"]


def test_resume_on_another_number_of_processes_is_one_line(tmp_path):
    folder = _fake_checkpoint(tmp_path / "checkpoint-2", ranks=2)
    resume_checks.check_world_size(folder, 2)
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 1.*train.init_from="):
        resume_checks.check_world_size(folder, 1)


# ---------------------------------------------------------------------------------------------- value checks

def test_validate_reads_values_finite_dtype_shape(tmp_path):
    import numpy as np

    from nextgpt.data.file_checks import CORRUPT, MISSING, check_values

    good = tmp_path / "good.npy"
    np.save(good, np.ones((4, 3), np.float32))
    assert check_values(good, (4, 3), "float32", full=True) is None
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[1.0, np.nan, np.inf]] * 4, np.float32))
    assert check_values(nan, (4, 3), "float32", full=False) is None  # cheap mode: header only
    kind, reason = check_values(nan, (4, 3), "float32", full=True)
    assert kind == CORRUPT and "8 non-finite value(s)" in reason and str(nan) in reason
    half = tmp_path / "half.npy"
    np.save(half, np.ones((4, 3), np.float16))
    kind, reason = check_values(half, (4, 3), "float32", full=True)
    assert kind == CORRUPT and "dtype float16, the manifest says float32" in reason
    assert check_values(good, (4, 4), None, full=True)[1].endswith("shape (4, 3), expected (4, 4)")
    assert check_values(tmp_path / "absent.npy", None, None, True, "ImageBind feature")[0] == MISSING


# ---------------------------------------------------------------------------------------------- image modes

def _rgb_of(image):
    import numpy as np

    from nextgpt.imagebind.preprocess import to_rgb

    out = to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_image_modes_decode_to_what_a_viewer_shows():
    import numpy as np
    from PIL import Image

    gray16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))             # mid-grey at 16 bits (mode I;16)
    assert gray16.mode == "I;16"
    assert np.all(_rgb_of(gray16) == 128)                                   # convert("RGB") gives 255 (white)
    gray_i = Image.fromarray(np.full((4, 4), 65535, np.int32), "I")
    assert np.all(_rgb_of(gray_i) == 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))                          # fully transparent, black underneath
    rgba.putpixel((0, 0), (200, 10, 10, 255))
    pixels = _rgb_of(rgba)
    assert tuple(pixels[0, 0]) == (200, 10, 10) and tuple(pixels[3, 3]) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(_rgb_of(palette)[0, 0]) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert tuple(_rgb_of(palette)[0, 0]) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))                      # pure red in CMYK
    assert tuple(_rgb_of(cmyk)[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_ignored_as_the_original_does(tmp_path):
    """ImageBind's loader is Image.open(...).convert("RGB"): the stored pixels, EXIF orientation not applied."""
    import numpy as np
    from PIL import Image

    from nextgpt.imagebind.preprocess import load_image

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6                                                        # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    image.save(tmp_path / "plain.png")
    assert np.array_equal(load_image(tmp_path / "rotated.png").numpy(), load_image(tmp_path / "plain.png").numpy())


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    from nextgpt.imagebind.preprocess import MediaError, load_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def png(name, width, height):  # a PNG header promising width x height RGB pixels, a few bytes of data
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                                      chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
        return tmp_path / name

    # 60 M pixels (180 MB as RGB): below PIL's own guard, refused by ours at the header, before decoding.
    with pytest.raises(MediaError, match=r"big.png: 10000x6000 pixels, more than .*decompression-bomb guard"):
        load_image(png("big.png", 10000, 6000))
    # 400 M pixels: PIL's own guard fires inside Image.open; still one MediaError naming the file.
    with pytest.raises(MediaError, match=r"bomb.png: .*decompression-bomb guard"):
        load_image(png("bomb.png", 20000, 20000))


# ---------------------------------------------------------------------------------------------- stale caches

@pytest.mark.parametrize("layout", ["files", "shards"])
def test_stale_caption_embedding_is_detected(tmp_path, layout):
    """A caption embedding records the hash of its caption; a caption edited afterwards makes it stale (named),
    and reading it for the new caption is refused (training: collate; validation: check_item)."""
    import numpy as np

    from nextgpt import store

    section = store.Section(encoder="enc", shape=[4], dtype="float32", fingerprint="fp", hashed=True)
    writer = store.StoreWriter(tmp_path, store.KINDS[0], "image", section, layout)
    writer.put(["a.jpg", "b.jpg"], np.ones((2, 4), np.float32),
               [store.caption_hash("a red circle"), store.caption_hash("a blue square")])
    writer.close()
    store.finish_share(tmp_path, store.KINDS[0], "image", section, layout, 0, 1)
    reader = store.open_reader(tmp_path)
    assert reader.stale("a.jpg", "a red circle") is None
    assert "stale caption embedding of a.jpg (made from another caption" in reader.stale("a.jpg", "a red square")
    with pytest.raises(store.StoreError, match="stale caption embedding of b.jpg"):
        reader.get("b.jpg", caption="a blue circle")
    assert reader.get("b.jpg", caption="a blue square").shape == (4,)
    assert store.check_item(tmp_path / "a.jpg.npy", (4,), caption="edited").startswith(str(tmp_path))


def test_features_of_another_imagebind_are_refused(tmp_path):
    import numpy as np

    from nextgpt import store

    section = store.Section(encoder="imagebind_huge.pth", shape=[8], dtype="float32", fingerprint="abc")
    writer = store.StoreWriter(tmp_path, store.KINDS[1], "image", section)
    writer.put(["a.jpg"], np.ones((1, 8), np.float32))
    writer.close()
    store.finish_share(tmp_path, store.KINDS[1], "image", section, "files", 0, 1)
    store.open_reader(tmp_path).check("image", (8,), fingerprint="abc")
    with pytest.raises(store.StoreError, match=r"made by imagebind_huge.pth \(abc\), not by the configured xyz"):
        store.open_reader(tmp_path).check("image", (8,), fingerprint="xyz")


# ---------------------------------------------------------------------------------------------- train.py, end to end

def test_sigterm_inside_a_step_saves_it_and_the_run_resumes_to_the_end(tiny_env, tmp_path, monkeypatch, capsys):
    """SIGTERM arrives during step 3's forward: the step is finished, checkpoint-3 saved (it verifies), exit 143
    with the resume hint; the same command then finishes the run. A second run into the folder meanwhile is
    refused by the lock; the lock is released at exit."""
    import train
    from nextgpt.model import nextgpt as model_lib

    calls = {"n": 0}
    original = model_lib.NextGPT.forward

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    out = tmp_path / "run"
    argv = tiny_env.argv("stage_1", f"train.output_dir={out}", "data.datasets=[audiocap_enc]", "train.init_from=",
                         "train.micro_batch_size=6", "train.save_every=0", "train.report_to=[]") + ["--max-steps", "4"]
    monkeypatch.setattr(model_lib.NextGPT, "forward", forward)
    assert train.main(argv) == 143
    err = capsys.readouterr().err
    assert "error: interrupted at step 3 (SIGTERM; saved checkpoint-3); resume with the same command" in err
    assert (out / "latest").read_text().strip() == "checkpoint-3" and not (out / "done.json").exists()
    assert resume_checks.verify(out / "checkpoint-3") == [] and not (out / runlock.LOCK_NAME).exists()
    monkeypatch.setattr(model_lib.NextGPT, "forward", original)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    assert train.main(argv) == 0
    assert json.loads((out / "done.json").read_text())["step"] == 4
    assert "resumed from" in (out / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- storage by cause

def _mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")
def test_torch_zip_writer_failure_is_named_by_its_cause(tmp_path):
    """torch.save onto a full disk raises the zip writer's "unexpected pos" RuntimeError without an errno; the
    file system, asked before the partial file is removed, says ENOSPC; a read-only mount says EROFS."""
    import torch

    from nextgpt.io import newest_file, storage_cause

    full, ro = tmp_path / "full", tmp_path / "ro"
    if not _mount_tmpfs(full, "2m"):
        pytest.skip("mount failed")
    try:
        assert storage_cause(full) is None                      # room for the probe: no cause to report
        with pytest.raises(RuntimeError) as info:
            torch.save({"w": torch.zeros(1 << 20)}, full / "state.pt")   # 4 MiB into 2 MiB
        assert "No space left" not in str(info.value)         # what the issue saw: the cause is not in the text
        assert storage_cause(full) == errno.ENOSPC and newest_file(full) == full / "state.pt"
        del info                                               # the traceback holds torch's open file
        import gc

        gc.collect()
        (full / "state.pt").unlink()
        assert storage_cause(full) is None                      # space again once the partial file is gone
        subprocess.run(["mount", "-o", "remount,ro", str(full)], check=True)
        assert storage_cause(full / "checkpoint-2") == errno.EROFS  # a folder not yet made: its parent's mount
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
