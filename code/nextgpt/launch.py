"""`python -m nextgpt.launch` forwards to nextgpt.training.launch: the name leaves the repository (Makefile, README,
users' own job scripts run `python -m nextgpt.launch ...`), so it keeps working after the launcher moved."""
from nextgpt.training.launch import *  # noqa: F401,F403
from nextgpt.training.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
