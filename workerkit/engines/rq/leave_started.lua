-- The fenced start of a change of hands, shared by requeue.lua and defer.lua (after owned.lua,
-- before either): return 0 unless this attempt owns the lease and is still started; then take
-- it out of the started registries and write workerkit's new state of the job (the job hash's
-- 'workerkit' field, jobs.META_KEY; never the user's 'meta'). KEYS and ARGV[1..4] as theirs.
local lease = redis.call('GET', KEYS[1])
if not owned(lease, ARGV[1], ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[3], ARGV[3]) == false then
  if lease then redis.call('DEL', KEYS[1]) end
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], 'workerkit', ARGV[4]) end
