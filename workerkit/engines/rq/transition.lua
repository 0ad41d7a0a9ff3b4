-- Move the lease to another state, only while the attempt is still a started member (not
-- settled already). After owned.lua. KEYS: lease, started set. ARGV: token, accepted, new
-- state, ttl ms, member. Returns 1 when moved.
local lease = redis.call('GET', KEYS[1])
if not owned(lease, ARGV[1], ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[5]) == false then return 0 end
redis.call('SET', KEYS[1], ARGV[3] .. ':' .. ARGV[1], 'PX', ARGV[4])
return 1
