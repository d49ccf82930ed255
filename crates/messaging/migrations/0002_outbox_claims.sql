-- The sweeper claims the unsent rows it publishes until this time (microseconds), so the
-- sweepers of several replicas do not publish the same rows at once.
ALTER TABLE outbox ADD COLUMN claimed_until BIGINT NOT NULL DEFAULT 0;
