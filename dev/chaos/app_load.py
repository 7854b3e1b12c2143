"""The web demo under load: concurrent browser-like sessions against code/app.py through gradio_client.

    python -m chaos.app_load                     # 10 clients, 50 requests, 2 disconnects (`make chaos` runs it)
    python -m chaos.app_load --quick             # 4 clients, 12 requests, 1 disconnect (the test suite's form)

The app runs as its own process on 127.0.0.1 (a free port; nothing else is contacted) on the tiny checkpoints with
the programmed LLM (scripts/tiny/programmed_llm.py: a greedy reply WORD [IMG0..3] ..., so max new tokens 6 gives one
image and 2 gives text only), with an upload limit (--max-file-size). Requests cycle through text, image
generation, an uploaded image exactly at the size limit, a long generation (more decoder steps) and an upload one
byte over the limit (refused by Gradio). `--disconnect` clients submit a long generation and close their
connection mid-reply. Checked: every request is answered or refused with a message (only the oversize upload may
be refused; an error on a valid request fails the test); the server still answers
afterwards; its RSS and open files come back to their level after the burst (within --rss-slack-mb / 8 files);
every session folder is removed once its client has gone. Prints requests/s, p50 / p95 latency, peak RSS; bounded
(each request --timeout s, the whole run --deadline s) and stops the app at the end. Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import REPO, machine_line, workspace

KINDS = ("text", "image", "upload", "long", "oversize")


def rss_and_files(pid: int) -> tuple[int, int]:
    """(resident bytes, open file descriptors) of `pid` from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """RSS / open files of the app every 50 ms, for the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_files, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                rss, files = rss_and_files(self.pid)
            except OSError:
                return
            self.peak_rss, self.peak_files = max(self.peak_rss, rss), max(self.peak_files, files)


def listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_app(command: list[str], log: Path, timeout: float) -> tuple[subprocess.Popen, Path]:
    """Start the app; -> (process, its session-files root) once it accepts connections on its --port."""
    port = int(command[command.index("--port") + 1])
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        text = log.read_text()
        if "serving on" in text and "session files under" in text and listening(port):
            return process, Path(text.split("session files under ", 1)[1].split(" (removed", 1)[0])
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the app did not start (exit {process.poll()}): {log.read_text()[-2000:]}")


def request_args(kind: str, image: Path, oversize: Path, word: str) -> tuple[dict, float, float]:
    """(message, max new tokens, decoder steps) of one request kind."""
    if kind == "text":
        return {"text": f"say {word}", "files": []}, 2, 2
    if kind == "image":
        return {"text": f"draw a picture for {word}", "files": []}, 6, 2
    if kind == "upload":
        return {"text": "what is in this image?", "files": [str(image)]}, 2, 2
    if kind == "oversize":
        return {"text": "and this one?", "files": [str(oversize)]}, 2, 2
    return {"text": f"draw {word} slowly", "files": []}, 6, 20             # long: ten times the decoder steps


def outcome(result) -> tuple[str, str]:
    """("answered" | "refused" | "lost", the assistant's last text) of a finished /respond call."""
    history = result[1] if isinstance(result, (list, tuple)) and len(result) > 1 else None
    texts = []
    for entry in history or []:
        if entry.get("role") != "assistant":
            continue
        for part in entry.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif isinstance(part, dict) and part.get("type") == "file":
                texts.append("[file]")
    if not texts:
        return "lost", ""
    last = texts[-1]
    if "error:" in last:
        return "refused", last
    return "answered", last


def client_worker(url: str, plan: list[str], disconnect: bool, image: Path, oversize: Path, word: str,
                  timeout: float, results: list, lock: threading.Lock) -> None:
    """One browser session: its requests in order (latency from submit to the final output); a disconnecting
    session closes its connection while its long reply is being generated."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    try:
        for kind in plan:
            message, tokens, steps = request_args(kind, image, oversize, word)
            message = {"text": message["text"], "files": [handle_file(f) for f in message["files"]]}
            started = time.time()
            try:
                job = client.submit(message, [], 0.4, 1.0, tokens, steps, 7.5, 13, api_name="/respond")
                if disconnect:
                    while not job.done() and not job.outputs() and time.time() - started < timeout:
                        time.sleep(0.02)                            # the reply has started streaming
                    job.cancel()
                    record = ("disconnected", "closed mid-reply")
                else:
                    record = outcome(job.result(timeout=timeout))
            except Exception as e:                                 # noqa: BLE001 - a refusal is an outcome
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                refused = any(w in text.lower() for w in ("exceeds the maximum file size", "too large", "error"))
                record = ("refused" if refused else "lost", text)
            with lock:
                results.append({"kind": kind, "outcome": record[0], "detail": record[1][:200],
                                "seconds": time.time() - started, "disconnect": disconnect})
    finally:
        client.close()


def sessions_left(root: Path) -> list[str]:
    folder = root / "sessions"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def load_test(command: list[str], word: str, image: Path, work: Path, clients: int = 10, requests: int = 50,
              disconnects: int = 2, size_limit: int = 0, timeout: float = 300, rss_slack_mb: float = 64,
              start_timeout: float = 300, log=print) -> dict:
    """Run the app (`command`, which must end in --port P), drive it, stop it; -> the figures and problems."""
    work.mkdir(parents=True, exist_ok=True)
    oversize = work / f"oversize{image.suffix}"
    upload = work / f"at_limit{image.suffix}"
    if size_limit:
        # The upload exactly at the limit: the image padded with zeros after its end (decoders stop at the end
        # marker); the oversize one a byte longer.
        data = image.read_bytes()
        upload.write_bytes(data + b"\0" * max(0, size_limit - len(data)))
        oversize.write_bytes(data + b"\0" * max(0, size_limit + 1 - len(data)))
    else:
        upload.write_bytes(image.read_bytes())
        oversize.write_bytes(image.read_bytes())
    port = command[command.index("--port") + 1]
    url = f"http://127.0.0.1:{port}/"
    process, root = start_app(command, work / "app.log", start_timeout)
    problems: list[str] = []
    try:
        warm: list = []
        client_worker(url, ["upload", "image"], False, upload, oversize, word, timeout, warm, threading.Lock())
        if any(r["outcome"] != "answered" for r in warm):
            problems.append(f"warm-up requests failed: {warm}")
        time.sleep(1.0)
        rss_before, files_before = rss_and_files(process.pid)
        kinds = [k for k in KINDS if size_limit or k != "oversize"]
        plans = [[] for _ in range(clients)]
        for index in range(requests - disconnects):
            plans[index % (clients - disconnects)].append(kinds[index % len(kinds)])
        for index in range(disconnects):
            plans[clients - disconnects + index] = ["long"]
        sampler = Sampler(process.pid)
        sampler.start()
        results: list = []
        lock = threading.Lock()
        started = time.time()
        threads = [threading.Thread(target=client_worker, args=(url, plan, c >= clients - disconnects, upload,
                                                                 oversize, word, timeout, results, lock))
                   for c, plan in enumerate(plans)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout * max(len(p) for p in plans) + 60)
        elapsed = time.time() - started
        sampler.done.set()
        # after the burst: the server still answers, its memory and files settle, the sessions' folders go
        after: list = []
        client_worker(url, ["text"], False, upload, oversize, word, timeout, after, threading.Lock())
        if not after or after[0]["outcome"] != "answered":
            problems.append(f"the server does not answer after the burst: {after}")
        deadline = time.time() + 30
        while time.time() < deadline:
            rss_after, files_after = rss_and_files(process.pid)
            left = sessions_left(root)
            if files_after <= files_before + 8 and not left:
                break
            time.sleep(1.0)
        served = [r for r in results if not r["disconnect"]]
        counts = {o: sum(r["outcome"] == o for r in results) for o in ("answered", "refused", "lost", "disconnected")}
        latencies = sorted(r["seconds"] for r in served if r["outcome"] == "answered")
        lost = [r for r in results if r["outcome"] == "lost"]
        if len(results) != requests:
            problems.append(f"{requests - len(results)} request(s) never finished")
        if lost:
            problems.append(f"{len(lost)} request(s) neither answered nor refused with a message: {lost[:3]}")
        failed = [r for r in results if r["outcome"] == "refused" and r["kind"] != "oversize"]
        if failed:
            problems.append(f"{len(failed)} valid request(s) failed with an error: {failed[:3]}")
        if size_limit and not any(r["kind"] == "oversize" and r["outcome"] == "refused" for r in results):
            problems.append("no upload over the size limit was refused")
        if any(r["kind"] == "upload" and r["outcome"] != "answered" for r in results):
            problems.append("an upload at the size limit was not answered: "
                            f"{[r for r in results if r['kind'] == 'upload' and r['outcome'] != 'answered'][:2]}")
        if files_after > files_before + 8:
            problems.append(f"open files {files_before} before the burst, {files_after} after")
        if rss_after > rss_before + rss_slack_mb * 2**20:
            problems.append(f"RSS {rss_before / 2**20:.0f} MB before the burst, {rss_after / 2**20:.0f} MB after "
                            f"(more than {rss_slack_mb:.0f} MB above)")
        if left:
            problems.append(f"{len(left)} session folder(s) not removed: {left[:4]}")
        if process.poll() is not None:
            problems.append(f"the app exited ({process.returncode}) during the test")
        figures = {
            "clients": clients, "requests": requests, "disconnects": disconnects, "outcomes": counts,
            "seconds": round(elapsed, 2), "requests_per_s": round(len(results) / elapsed, 3),
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)
            if latencies else None,
            "rss_before_mb": round(rss_before / 2**20, 1), "rss_peak_mb": round(sampler.peak_rss / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1), "files_before": files_before,
            "files_peak": sampler.peak_files, "files_after": files_after, "sessions_left": len(left),
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if root.exists():
        problems.append(f"{root}: the app's session root survived its exit")
    return {**figures, "problems": problems, "results": results}


def app_command(env, programmed: dict, port: int, size_limit: int) -> list[str]:
    argv = env.argv("stage_3", *programmed["overrides"], "inference.max_new_tokens=6")
    return [sys.executable, str(REPO / "code" / "app.py"), *argv, "--ckpt", str(programmed["deltas"]["signal"]),
            "--port", str(port), "--max-file-size", f"{size_limit}b"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--disconnect", type=int, default=2, help="clients that close their connection mid-reply")
    p.add_argument("--quick", action="store_true", help="4 clients, 12 requests, 1 disconnect")
    p.add_argument("--size-limit", type=int, default=64 * 1024, help="the app's --max-file-size, bytes")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--rss-slack-mb", type=float, default=64)
    p.add_argument("--workdir", default=str(REPO / "runs" / "chaos" / "app_load"))
    p.add_argument("--json", default=None, help="figures JSON (default: <workdir>/app_load.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.disconnect = 4, 12, 1
    from nextgpt.runtime import free_port
    from tiny import programmed_llm

    work = Path(args.workdir).resolve()
    print(machine_line())
    env = workspace(work.parent / "tiny")
    _ = env.imagebind
    programmed = programmed_llm.build(env, work / "programmed")
    image = sorted((env.data / "T_X_pair_data" / "cc3m" / "images").glob("*.jpg"))[0]
    report = load_test(app_command(env, programmed, free_port(), args.size_limit), programmed["word"], image, work,
                       args.clients, args.requests, args.disconnect, args.size_limit, args.timeout, args.rss_slack_mb)
    path = Path(args.json) if args.json else work / "app_load.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"app under load: {report['clients']} clients, {report['requests']} requests "
          f"({report['disconnects']} disconnected mid-reply): {report['outcomes']}; {report['requests_per_s']} "
          f"requests/s, latency p50 {report['latency_p50_s']} s / p95 {report['latency_p95_s']} s, RSS "
          f"{report['rss_before_mb']} -> peak {report['rss_peak_mb']} -> {report['rss_after_mb']} MB, open files "
          f"{report['files_before']} -> {report['files_peak']} -> {report['files_after']}; wrote {path}")
    for problem in report["problems"]:
        print(f"FAIL {problem}")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
