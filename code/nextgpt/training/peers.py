"""What one rank must know about the others: that the folders it writes are the ones rank 0 sees, and that they
are still alive.

    prove_shared({"train.output_dir": out}, rank)      # collective, at start: every rank reads rank 0's nonce
    beat = Heartbeat(rank, world_size).start()          # a daemon thread counting in the job's TCPStore
    ...                                                 # a collective fails (a peer was killed, its node is gone)
    beat.lost() -> [(1, "node1")]                       # the ranks whose count stopped moving; beat.stop()

Shared folders: a job is one output folder, one caption-embedding folder, one feature folder. On nodes that each
mount their own disk at the same path, every rank would write its part where no other rank (and no resumed run)
sees it, and the run would end with exit 0 and unresumable checkpoints. Rank 0 writes a nonce file into each
folder, every rank reads it, and a rank that does not see it makes every rank stop in one line naming the folder.

Dead ranks: gloo / NCCL report a killed peer as "Connection closed by peer" or a timeout, naming an address at
best. Each rank counts up `nextgpt/beat/<rank>` every POLL seconds in the rendezvous store every launcher starts
(MASTER_ADDR:MASTER_PORT: rank 0's process under `deepspeed`, node 0's agent under torchrun); after a failed
collective, the ranks whose count stands still for a few beats are the dead ones. The store living in rank 0's
process, a dead rank 0 shows as the store itself going away.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

from nextgpt.io import first_line

POLL_SECONDS = 1.0
STILL_BEATS = 3              # beats a count must stand still for its rank to count as gone
NONCE_PREFIX = ".shared-check."


class PeerLost(RuntimeError):
    """A rank (or the node holding it) stopped answering; every surviving rank prints the line (nextgpt.cli)."""

    exit_code = 2
    every_rank = True        # rank 0 may be the dead one: the line must not depend on it


class NotShared(ValueError):
    """A folder a rank writes is not the folder rank 0 sees (nodes with their own disks)."""

    every_rank = True


def _collective() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def prove_shared(folders: dict[str, Path], rank: int) -> None:
    """Collective: every rank must see the nonce rank 0 wrote into each folder, else NotShared on every rank.
    `folders`: {the setting that names it (train.output_dir, data.embed_dir, ...): its path}, the same on every
    rank. Rank 0 creates missing folders first (it is the one that will write into them)."""
    if not _collective():
        return
    import torch.distributed as dist

    box = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{NONCE_PREFIX}{box[0]}").write_text(box[0])
    dist.broadcast_object_list(box, src=0)
    nonce = box[0]
    unseen = []
    for key, folder in folders.items():
        try:
            seen = (folder / f"{NONCE_PREFIX}{nonce}").read_text() == nonce
        except OSError:
            seen = False
        if not seen:
            unseen.append(key)
    answers: list = [None] * dist.get_world_size()
    dist.all_gather_object(answers, (socket.gethostname(), unseen))
    if rank == 0:
        for folder in folders.values():
            (folder / f"{NONCE_PREFIX}{nonce}").unlink(missing_ok=True)
    for key, folder in folders.items():
        blind = [(r, host) for r, (host, keys) in enumerate(answers) if key in keys]
        if blind:
            r, host = blind[0]
            others = f" (and {len(blind) - 1} more rank(s))" if len(blind) > 1 else ""
            raise NotShared(
                f"{key} {folder}: rank {r} (host {host}){others} does not see the file rank 0 (host {answers[0][0]}) "
                "wrote there, so it is not one folder shared by every node; put it on a shared file system "
                "(NFS, Lustre, ...) mounted at the same path on every node (node-local storage, DeepSpeed's "
                "checkpoint.use_node_local_storage, is not supported by these checkpoints: one run folder, one "
                "latest)")


class Heartbeat:
    """A daemon thread counting `nextgpt/beat/<rank>` up in the job's store every POLL_SECONDS (module doc)."""

    def __init__(self, rank: int, world_size: int, poll: float = POLL_SECONDS):
        self.rank, self.world_size, self.poll = rank, world_size, poll
        self.store = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self):
        import torch.distributed as dist

        # A client of the store the launcher's rendezvous already runs (the job's only shared service), with a
        # short timeout: when its host is gone every call fails at once instead of waiting the default 5 minutes.
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(2.0, 5 * self.poll)), wait_for_workers=False)

    def start(self) -> "Heartbeat":
        if self.world_size > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            self.store = self._connect()
            self.store.set(f"nextgpt/host/{self.rank}", socket.gethostname())
            self.store.add(f"nextgpt/beat/{self.rank}", 1)
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _beat(self) -> None:
        while not self._done.wait(self.poll):
            try:
                self.store.add(f"nextgpt/beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store's host is gone; lost() tells that story
                return

    def _counts(self, store) -> list[int]:
        return [store.add(f"nextgpt/beat/{r}", 0) for r in range(self.world_size)]

    def lost(self) -> list[tuple[int, str]]:
        """[(rank, host)] of the ranks whose beat stood still for STILL_BEATS beats ([] when every rank beats
        or there is no store); rank 0 with host "?" when the store itself is gone (it lived in rank 0)."""
        if self.store is None:
            return []
        try:
            store = self._connect()  # a fresh connection: the beating thread's one may be mid-call
            before = self._counts(store)
            time.sleep(STILL_BEATS * self.poll)
            after = self._counts(store)
            hosts = {}
            for r in range(self.world_size):
                try:
                    hosts[r] = store.get(f"nextgpt/host/{r}").decode()
                except Exception:  # noqa: BLE001 - a rank that died before saying where it ran
                    hosts[r] = "?"
        except Exception:  # noqa: BLE001 - connection refused / reset: the store's host (rank 0's process) is gone
            return [] if self.rank == 0 else [(0, "?")]
        return [(r, hosts[r]) for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def explain(self, error: BaseException, output_dir: Path) -> PeerLost | None:
        """The one-line PeerLost for a failed collective when some rank is gone, else None (not a dead peer)."""
        gone = self.lost()
        if not gone:
            return None
        names = ", ".join(f"rank {r}" + (f" (host {h})" if h != "?" else "") for r, h in gone)
        pointer = Path(output_dir) / "latest"
        last = pointer.read_text().strip() if pointer.is_file() else None
        resume = (f"the last complete checkpoint is {last}: run the same command to continue from it "
                  "(--resume auto)") if last else "no checkpoint was completed yet: run the same command to start over"
        # gloo's text starts with its source location: "[.../gloo/transport/tcp/pair.cc:553] Connection closed ..."
        what = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0][:100]
        return PeerLost(f"{names} stopped answering (killed, crashed or its node unreachable); rank {self.rank} "
                        f"stopped ({type(error).__name__}: {what}); {resume}")
