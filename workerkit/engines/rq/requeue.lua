-- Put the job back at the front of its queue, out of the started registries, lease dropped.
-- After owned.lua and leave_started.lua. KEYS: AttemptKeys.keys(). ARGV: token, accepted,
-- member, workerkit's new state ('' keeps it), job id. Returns 1 when requeued; 0 when another attempt owns
-- the job or this one was settled already (a leftover lease of a settled attempt is dropped).
redis.call('HSET', KEYS[4], 'status', 'queued')
redis.call('LPUSH', KEYS[5], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
