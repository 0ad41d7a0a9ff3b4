-- In-flight entries back to the head (the right end) of their queues, oldest nearest the head.
-- KEYS[1]: the registry hash, KEYS[2]: the owner's liveness key, KEYS[3]: the gone set, then
-- pairs: an in-flight list, its queue key. ARGV[1]: 'own' (the owner itself) or 'dead' (only
-- while the owner's liveness key is gone), ARGV[2]: the owner, ARGV[3]: after how long gone
-- (ms) a dead owner's lists leave the registry. Until then every recovery pass looks at them
-- again: a blocking pop the owner sent before it was found gone may still land in one.
-- Returns how many entries moved.
if ARGV[1] == 'dead' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local moved = 0
for i = 4, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT') do
    moved = moved + 1
  end
end
if ARGV[1] == 'dead' then
  local now = redis.call('TIME')
  now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZADD', KEYS[3], 'NX', now, ARGV[2])
  local since = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[2]))
  if now - since > tonumber(ARGV[3]) then
    for i = 4, #KEYS, 2 do redis.call('HDEL', KEYS[1], KEYS[i]) end
    redis.call('ZREM', KEYS[3], ARGV[2])
  end
end
return moved
