"""Names the database and the Python code share: the table, the NOTIFY channels, the
Realtime Broadcast topics and the statuses a row can have. The SQL in
`supabase/migrations/` spells them too; these are the only Python copies."""

from __future__ import annotations

from typing import Final, Literal, get_args

TABLE: Final = "agent_task_requests"  # public.<TABLE>: one row per task
WAKE_CHANNEL: Final = "agent_task_requests"  # NOTIFY: a row became pending (the bridge listens)
CANCEL_CHANNEL: Final = "agent_task_cancel"  # NOTIFY 'id:attempt': a held row was asked to stop
# Realtime Broadcast (private topics; schema 6). A task's topic is TASK_TOPIC_PREFIX + its id,
# with events `state` and `chunk`; the bridge's wake-up topic is service-only.
TASK_TOPIC_PREFIX: Final = "agent_task:"
WAKEUP_TOPIC: Final = "agent_bridge:wakeups"
WAKEUP_EVENT: Final = "pending"

# A row's status (the table's check constraint allows these four).
Status = Literal["pending", "processing", "completed", "failed"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
