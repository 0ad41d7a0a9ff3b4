-- The task succeeded: its checkpoint and fence go, unless a newer attempt owns them.
-- KEYS: fence, checkpoint. ARGV: retries, gen, started_ms, ttl.
if stale(redis.call('GET', KEYS[1])) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
