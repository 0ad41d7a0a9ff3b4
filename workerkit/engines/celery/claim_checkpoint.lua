-- Read the checkpoint and take the fence, atomically: {1, checkpoint} or {0, checkpoint}
-- (stale). KEYS: fence, checkpoint. ARGV: retries, gen, started_ms, ttl.
local stored = redis.call('GET', KEYS[2])
if stale(redis.call('GET', KEYS[1])) then return {0, stored} end
take()
return {1, stored}
