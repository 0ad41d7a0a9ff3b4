-- Who leads: {holder, epoch, ms left} by Redis's clock, or false. KEYS[1] the lease hash.
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if not cur[1] then return false end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then return false end
return {cur[1], cur[2], left}
