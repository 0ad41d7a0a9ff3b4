-- As leader: delete fire records older than a time, keeping each schedule's last one.
-- KEYS[1] lease hash, KEYS[2] the set of known names; ARGV holder, epoch, key prefix,
-- older-than ms, at most this many per schedule (bounds the script's time; the leader prunes
-- again). Returns how many went, or -1 when the lease is not this holder's under this epoch.
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return -1 end
local gone = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local index = ARGV[3] .. 'index:' .. name
  local last = redis.call('HGET', ARGV[3] .. 'last:' .. name, 'fire_ms')
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. ARGV[4], 'LIMIT', 0, ARGV[5])
  for _, ms in ipairs(old) do
    if ms ~= last then
      redis.call('DEL', ARGV[3] .. 'fire:' .. name .. ':' .. ms)
      redis.call('ZREM', index, ms)
      gone = gone + 1
    end
  end
end
return gone
