-- As leader: delete fire records older than a time, keeping each schedule's last one.
-- KEYS[1] lease hash, KEYS[2] the set of known names; ARGV epoch, key prefix, older-than ms,
-- at most this many per schedule (bounds the script's time; the leader prunes again).
-- Returns how many went, or -1 when the epoch is not current.
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local gone = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local index = ARGV[2] .. 'index:' .. name
  local last = redis.call('HGET', ARGV[2] .. 'last:' .. name, 'fire_ms')
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. ARGV[3], 'LIMIT', 0, ARGV[4])
  for _, ms in ipairs(old) do
    if ms ~= last then
      redis.call('DEL', ARGV[2] .. 'fire:' .. name .. ':' .. ms)
      redis.call('ZREM', index, ms)
      gone = gone + 1
    end
  end
end
return gone
