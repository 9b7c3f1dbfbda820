"""``python -m plexus``."""

import os
import sys

if getattr(sys.modules.get("plexus"), "__file__", None) is None:
    # a folder named plexus/ in the current directory (a clone's root, say) was imported as a
    # namespace package in place of the installed one: look past the current directory
    sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    for name in [m for m in sys.modules if m == "plexus" or m.startswith("plexus.")]:
        del sys.modules[name]

from plexus.commands.main import main  # noqa: E402

if __name__ == "__main__":
    main()
