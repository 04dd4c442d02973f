"""`agent-bridge usage`: tokens and cost per tenant this period, against their budgets.

Show, for every tenant with spend on record or a budget of its own, what its tasks spent
in the current budget period (UTC day or month), what running tasks hold in
reservations, its token and cost budgets and what is left.

Reads public.agent_tenants_usage; budgets are set in agent_tenant_limits (token_budget,
cost_budget, budget_period).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from bridge.commands.parsers import Subparsers, add_command
from bridge.config import Settings
from bridge.store import TenantSpend, open_store


def register(sub: Subparsers) -> None:
    p = add_command(sub, "usage", run, __doc__,
                    "examples: agent-bridge usage  |  agent-bridge usage --json")
    p.add_argument("--json", action="store_true", help="print one JSON array instead")


def run(args: argparse.Namespace) -> int:
    store = open_store(Settings.from_env(), pool=False)
    try:
        tenants = store.tenants_usage()
    finally:
        store.close()
    if args.json:
        print(json.dumps([asdict(t) for t in tenants], indent=2))
        return 0
    if not tenants:
        print("💰 No spend on record and no tenant budgets.")
        return 0
    print(f"💰 Spend this period ({len(tenants)} tenants):")
    for t in tenants:
        print("   " + line(t))
    return 0


def line(t: TenantSpend) -> str:
    """One tenant, as `usage` prints it."""
    tokens = f"{t.tokens:,} tokens" + (f" of {t.token_budget:,}" if t.token_budget is not None
                                       else "")
    cost = f"cost {t.cost:,.2f}" + (f" of {t.cost_budget:,.2f}" if t.cost_budget is not None
                                    else "")
    held = (f", {t.reserved_tokens:,} tokens held by running tasks" if t.reserved_tokens
            else "")
    spent = " — budget spent" if ((t.tokens_left is not None and t.tokens_left <= 0)
                                  or (t.cost_left is not None and t.cost_left <= 0)) else ""
    return (f"{t.tenant}: {tokens}, {cost}{held} this {t.period} "
            f"(resets {t.resets_at[:16]} UTC){spent}")
