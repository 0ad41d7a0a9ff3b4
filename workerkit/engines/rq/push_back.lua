-- A job id this worker popped just as Redis went away (it could not start it): back to the
-- front of its queue, only if nobody has it. Not when the id is in the queue again (Redis
-- restarted from an append-only file written before the pop), when the job is not queued any
-- more, or when an attempt holds its lease.
-- KEYS: queue list, job hash, lease. ARGV: job id. Returns 1 when pushed back.
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
