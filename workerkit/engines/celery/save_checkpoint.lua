-- The fenced checkpoint write: 0 (and nothing written) when a newer attempt touched it.
-- KEYS: fence, checkpoint. ARGV: retries, gen, started_ms, ttl, state.
if stale(redis.call('GET', KEYS[1])) then return 0 end
take()
redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4])
return 1
