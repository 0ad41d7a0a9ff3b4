-- Not now: like requeue.lua, but into RQ's ScheduledJobRegistry at ARGV[6] (epoch seconds),
-- status 'scheduled', and into workerkit's deferred set (the jobs promote.lua may put back).
-- After owned.lua and leave_started.lua. KEYS: AttemptKeys.defer_keys(). ARGV: token,
-- accepted, member, workerkit's new state, job id, run at. Returns 1 when deferred.
redis.call('HSET', KEYS[4], 'status', 'scheduled')
redis.call('ZADD', KEYS[8], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[9], ARGV[6], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
