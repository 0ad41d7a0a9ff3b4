-- Take or keep the scheduler's lease, on Redis's clock.
-- KEYS[1] the lease hash, KEYS[2] the epoch counter (never expires); ARGV holder, duration ms.
-- Returns {1, holder, epoch, expires_at ms} when held, {0, holder, epoch, expires_at ms} when
-- another holds it. A new holder takes INCR of the counter: epochs only ever increase.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch', 'expires_at')
local epoch
if cur[1] then
  if cur[1] ~= ARGV[1] then return {0, cur[1], cur[2], cur[3]} end
  epoch = cur[2]
else
  -- A counter lost with Redis's data (no persistence) restarts from the clock in ms, above
  -- every epoch handed out before (fewer than one change of leader per ms): fencing holds.
  redis.call('SET', KEYS[2], string.format('%d', now), 'NX')
  epoch = string.format('%d', redis.call('INCR', KEYS[2]))
end
local expires = string.format('%d', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'epoch', epoch, 'expires_at', expires)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, ARGV[1], epoch, expires}
