-- The integration guide's table, exactly as users created it before agent-bridge
-- (tests/schema.py: GUIDE_TABLE).
CREATE TABLE agent_task_requests (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    status VARCHAR(50) NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    request_payload JSONB NOT NULL DEFAULT '{}'::jsonb,
    response_payload JSONB DEFAULT NULL,
    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW()
);
