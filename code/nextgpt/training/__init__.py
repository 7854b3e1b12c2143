"""Running a training job: the DeepSpeed engine and its JSON (deepspeed), the run log (runlog), the one-run-per-folder
lock (runlock), stopping on signals and dead peers (stop) and the signal-owning launcher (launch)."""
