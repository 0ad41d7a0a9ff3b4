-- Give the lease up now, fenced: only the holder under its epoch. KEYS[1] the lease hash;
-- ARGV holder, epoch. Returns 1 when released. The epoch counter stays: the next holder's is higher.
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
