"""agent-bridge: turns agent_task_requests rows into Celery jobs and writes the results back."""
