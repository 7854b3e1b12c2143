#!/usr/bin/env bash
# A free TCP port for DeepSpeed's rendezvous (its default 29500 collides when two runs share a machine):
# $MASTER_PORT when set, else one the kernel hands out (bound and released; the launcher binds it next).
set -euo pipefail
if [ -n "${MASTER_PORT:-}" ]; then
  echo "$MASTER_PORT"
  exit 0
fi
exec "$(dirname "${BASH_SOURCE[0]}")/python.sh" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
