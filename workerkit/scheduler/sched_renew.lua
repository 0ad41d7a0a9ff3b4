-- Extend the lease, fenced: only the holder under its epoch.
-- KEYS[1] the lease hash; ARGV holder, epoch, duration ms. Returns expires_at ms, or false.
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = string.format('%d', now + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'expires_at', expires)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return expires
