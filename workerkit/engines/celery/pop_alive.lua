-- The keeper's round: this worker is alive. When its liveness key was gone (a recovery may
-- have found it dead and, after a while, forgotten its in-flight lists), its lists are
-- registered again and it leaves the gone set.
-- KEYS[1]: the liveness key, KEYS[2]: the registry hash, KEYS[3]: the gone set, KEYS[4..]: its
-- in-flight lists. ARGV[1]: the owner, ARGV[2]: the TTL (ms), ARGV[3..]: their records.
local was = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if was == 1 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
for i = 4, #KEYS do redis.call('HSET', KEYS[2], KEYS[i], ARGV[i - 1]) end
return 1
