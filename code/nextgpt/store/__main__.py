"""`python -m nextgpt.store convert|info FOLDER`: see nextgpt/store/convert.py."""

from nextgpt.store.convert import main

raise SystemExit(main())
