"""`python -m chatui`: serve the chat UI on `CHATUI_HOST`:`CHATUI_PORT`."""

from __future__ import annotations

import sys

from chatui.app import build_app, launch_options
from chatui.settings import SettingsError, load_settings


def main() -> None:
    """Validate the settings, then serve until interrupted; bad settings exit with a message."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(str(exc))  # the message names each bad variable; exit status 1
    build_app(settings).launch(**launch_options(settings))


if __name__ == "__main__":
    main()
