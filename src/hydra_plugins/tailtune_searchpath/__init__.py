"""Adds the user's config dir ($TAILTUNE_CONFIG_DIR) to Hydra's search path.

Options placed there (e.g. ``data/mydata.yaml``, ``local/default.yaml``) become selectable
as if they shipped with tailtune, without editing the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class TailtuneSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        user_dir = os.environ.get("TAILTUNE_CONFIG_DIR")
        if user_dir:
            search_path.append("tailtune-user", f"file://{Path(user_dir).expanduser().resolve()}")
