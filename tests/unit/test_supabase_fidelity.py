"""The Supabase transport against what the real PostgREST and Supabase's gateway do, through
the PostgREST stand-in (tests/fakes/postgrest.py) with the real supabase-py client:
gateway and proxy errors, db-max-rows, read-only STABLE functions, PGRST203 for
overloads, the schema cache reload, and the new secret API keys."""

from __future__ import annotations

import pytest

from bridge.config import ConfigError, Settings

SECRET_KEY = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"  # the shape of Supabase's secret keys


























def test_batch_size_above_max_rows_is_refused_in_supabase_mode() -> None:
    with pytest.raises(ConfigError, match="BRIDGE_BATCH_SIZE \\(2000\\) is above "
                                          "SUPABASE_MAX_ROWS \\(1000\\)"):
        Settings.from_env(environ={"SUPABASE_URL": "https://x.supabase.co",
                                   "SUPABASE_SERVICE_KEY": SECRET_KEY,
                                   "BRIDGE_BATCH_SIZE": "2000"}, dotenv=False)














def test_a_publishable_key_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"publishable key .* use a secret key"):
        Settings.from_env(environ={"SUPABASE_URL": "https://x.supabase.co",
                                   "SUPABASE_SERVICE_KEY": "sb_publishable_abc"},
                          dotenv=False).require_store()


