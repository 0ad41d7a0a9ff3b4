-- Retry a failed (or stopped) job: out of the FailedJobRegistry, back at the end of its queue,
-- due now.
-- After dash_version.lua. KEYS: job hash, failed registry, queue list, rq:queues.
-- ARGV: job id, version, enqueued_at, workerkit's new state ('' keeps it), its state as read
-- ('' none), the queue list's key. Returns {1} done, {0, status} stale, {-1} no such job,
-- {-2, status} not failed.
local version, status = version_of(KEYS[1])
if not version then return {-1, ''} end
if version ~= ARGV[2] then return {0, status} end
if status ~= 'failed' and status ~= 'stopped' then return {-2, status} end
if (redis.call('HGET', KEYS[1], 'workerkit') or '') ~= ARGV[5] then return {0, status} end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return {0, status} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'enqueued_at', ARGV[3], 'exc_info', '')
redis.call('HDEL', KEYS[1], 'started_at', 'ended_at')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'workerkit', ARGV[4]) end
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[4], ARGV[6])
redis.call('RPUSH', KEYS[3], ARGV[1])
return {1, 'queued'}
