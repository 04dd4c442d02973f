"""A paid handler for the spend tests: it declares what one run may spend, keeps within the
grant it receives (`task["budget"]`), reports what it spent, and keeps its own ledger of
what it "bought" in $TEST_STATE_DIR/spend.ledger (one line per run: task id, tokens), the
way a provider's bill would show it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tasks import report_usage, spends

DECLARED = 1000  # tokens one run may spend
PROMPT_TOKENS = 100


@spends(tokens=DECLARED)
def metered(task: dict[str, Any]) -> dict[str, Any]:
    grant = (task.get("budget") or {}).get("tokens")
    tokens = DECLARED if grant is None else min(DECLARED, int(grant))
    with (Path(os.environ["TEST_STATE_DIR"]) / "spend.ledger").open("a") as ledger:
        ledger.write(f"{task['id']} {tokens}\n")
    time.sleep(0.3)  # the provider's answer takes a while: the others run meanwhile
    report_usage(input_tokens=min(PROMPT_TOKENS, tokens),
                 output_tokens=max(tokens - PROMPT_TOKENS, 0), cost=tokens / 1e6)
    return {"answer": f"spent {tokens} tokens"}
